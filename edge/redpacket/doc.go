// Package redpacket runs red-packet rains (SPEC §3, issue 13).
package redpacket
