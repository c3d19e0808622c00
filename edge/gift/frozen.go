package gift

import (
	"errors"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Accounts tells whether an account is frozen (edge/account): a frozen
// account can neither send nor receive (SPEC §2). nil = no account is.
type Accounts interface {
	Frozen(user int64) (bool, error)
}

// SetAccounts connects the account statuses; call before serving.
func (s *Service) SetAccounts(a Accounts) { s.accounts = a }

// checkFrozen refuses (20004, nothing moved) a gift from or to a frozen
// account; nil when both may move coins.
func (s *Service) checkFrozen(sender, receiver int64) *sendErr {
	if s.accounts == nil {
		return nil
	}
	for _, u := range [2]int64{sender, receiver} {
		frozen, err := s.accounts.Frozen(u)
		if err != nil {
			if pe := (*proto.Error)(nil); errors.As(err, &pe) {
				// A known "retry" (statuses being rebuilt after a Redis
				// loss): every gift meanwhile gets it, not an error each.
				s.log.Debug("gift: account status", "user", u, "err", err)
			} else {
				s.log.Error("gift: account status", "user", u, "err", err)
			}
			return fail(proto.CodeInternal, "account status unavailable, nothing moved; retry with the same req_id")
		}
		if frozen {
			if u == sender {
				return fail(proto.CodeAccountFrozen, "account frozen: your account cannot send gifts")
			}
			return fail(proto.CodeAccountFrozen, "account frozen: the receiver's account cannot receive gifts")
		}
	}
	return nil
}
