package proto

import (
	"errors"
	"fmt"
	"net/http"
)

// Reply codes (PROTOCOL.md §7). One table, used by the WebSocket replies and the
// HTTP envelope alike. Never renumber: clients switch on these.
const (
	CodeOK              = 0
	CodeBadRequest      = 10001 // parse error, missing field, out of range
	CodeUnauthenticated = 10002
	CodeForbidden       = 10003 // wrong role, not in room, not the room's anchor
	CodeNotFound        = 10004
	CodeConflict        = 10409 // duplicate / conflict
	CodeRateLimited     = 10429

	CodeInsufficientBalance = 20001
	CodeGiftUnavailable     = 20002
	CodeGiftToSelf          = 20003
	CodeAccountFrozen       = 20004 // extension: the sender's or receiver's account is frozen (HTTP 403)
	CodeGiftPriceChanged    = 20005 // extension: the gift was repriced while the request waited; nothing debited (HTTP 409)

	CodeRedPacketNotFound = 30001
	CodeRedPacketTaken    = 30002
	CodeRedPacketEmpty    = 30003

	CodeProductNotFound = 40001
	CodeOrderState      = 40002
	CodeSoldOut         = 40003
	CodeTicketLimit     = 40004 // over the per-order or per-user ticket limit
	CodeCouponUnusable  = 40005 // another user's, used, or unknown

	CodeInternal = 50000 // logged with a request id; the message never leaks internals
)

// Error is a reply error: a code from the table above and a human message.
// Handlers return it (wrapped or not); the transport turns it into a reply frame
// or an HTTP envelope. Any other error becomes CodeInternal.
type Error struct {
	Code int
	Msg  string
}

func (e *Error) Error() string { return fmt.Sprintf("%d: %s", e.Code, e.Msg) }

// Errorf builds an *Error.
func Errorf(code int, format string, args ...any) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// BadRequest is shorthand for the most common client error.
func BadRequest(format string, args ...any) *Error { return Errorf(CodeBadRequest, format, args...) }

// Common errors without per-call detail.
var (
	ErrNotFound    = &Error{Code: CodeNotFound, Msg: "not found"}
	ErrForbidden   = &Error{Code: CodeForbidden, Msg: "forbidden"}
	ErrRateLimited = &Error{Code: CodeRateLimited, Msg: "rate limited"}
	ErrInternal    = &Error{Code: CodeInternal, Msg: "internal error"}
)

// AsError extracts the reply error from err; errors that are not *Error map to
// CodeInternal (the caller logs the original).
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return ErrInternal
}

// HTTPStatus maps a reply code to the HTTP status of its class (PROTOCOL.md §2).
func HTTPStatus(code int) int {
	switch code {
	case CodeOK:
		return http.StatusOK
	case CodeUnauthenticated:
		return http.StatusUnauthorized
	case CodeForbidden, CodeAccountFrozen:
		return http.StatusForbidden
	case CodeNotFound, CodeProductNotFound, CodeRedPacketNotFound:
		return http.StatusNotFound
	case CodeConflict, CodeOrderState, CodeSoldOut, CodeRedPacketTaken, CodeRedPacketEmpty,
		CodeInsufficientBalance, CodeGiftPriceChanged:
		return http.StatusConflict
	case CodeRateLimited:
		return http.StatusTooManyRequests
	case CodeInternal:
		return http.StatusInternalServerError
	}
	if code >= 10000 && code < 50000 {
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
