package nettest

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// ServeDNS answers every one-question query on addr (UDP and TCP, inside
// the host namespace) with one A record holding ip, standing in for a
// resolver such as systemd-resolved's stub at 127.0.0.53. It returns a
// count of the queries answered. Stopped at test end.
func (e *Env) ServeDNS(t testing.TB, addr netip.AddrPort, ip netip.Addr) func() int {
	t.Helper()
	var pc net.PacketConn
	if err := e.Do(func() (err error) { pc, err = net.ListenPacket("udp4", addr.String()); return err }); err != nil {
		t.Fatalf("dns stub on udp %s: %v", addr, err)
	}
	t.Cleanup(func() { pc.Close() })
	var ln net.Listener
	if err := e.Do(func() (err error) { ln, err = net.Listen("tcp4", addr.String()); return err }); err != nil {
		t.Fatalf("dns stub on tcp %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	hits := make(chan struct{}, 10000)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if r := AnswerA(buf[:n], ip); r != nil {
				hits <- struct{}{}
				pc.WriteTo(r, from)
			}
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			var l [2]byte
			if _, err := io.ReadFull(c, l[:]); err == nil {
				q := make([]byte, binary.BigEndian.Uint16(l[:]))
				if _, err := io.ReadFull(c, q); err == nil {
					if r := AnswerA(q, ip); r != nil {
						hits <- struct{}{}
						c.Write(append([]byte{byte(len(r) >> 8), byte(len(r))}, r...))
					}
				}
			}
			c.Close()
		}
	}()
	return func() int { return len(hits) }
}

// AnswerA builds a reply with one A record (ip) to a query with one
// question; nil for anything else.
func AnswerA(q []byte, ip netip.Addr) []byte {
	if len(q) < 12 || q[2]&0x80 != 0 || binary.BigEndian.Uint16(q[4:6]) != 1 {
		return nil
	}
	end := 12
	for end < len(q) && q[end] != 0 {
		end += int(q[end]) + 1
	}
	end += 5 // root label, qtype, qclass
	if end > len(q) {
		return nil
	}
	r := append([]byte(nil), q[:end]...)
	r[2], r[3] = 0x81, 0x80
	binary.BigEndian.PutUint16(r[6:], 1)  // ANCOUNT
	binary.BigEndian.PutUint16(r[8:], 0)  // NSCOUNT
	binary.BigEndian.PutUint16(r[10:], 0) // ARCOUNT
	a := ip.As4()
	r = append(r, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4)
	return append(r, a[:]...)
}
