package proto

// MaxRedPacketCodeLen bounds the code of a grab (codes are 26 characters).
const MaxRedPacketCodeLen = 64

// GrabReq is the d of grab.
type GrabReq struct {
	Code string `json:"code"`
}

// Validate checks the fields.
func (r *GrabReq) Validate() *Error {
	if r.Code == "" || len(r.Code) > MaxRedPacketCodeLen {
		return BadRequest("code must be 1..%d bytes", MaxRedPacketCodeLen)
	}
	return nil
}
