// Package dnsfwd is banger-helper's DNS forwarder: guests are told to use
// their gateway as name server, and this relays their queries, unchanged,
// to the name servers of the host's /etc/resolv.conf. It works whatever the
// host uses (systemd-resolved's stub at 127.0.0.53, a plain resolv.conf, a
// VPN's split DNS), because it asks from the host itself, and it needs no
// NAT rule that would expose the host's loopback to guests.
//
// Everything a guest sends is hostile, so the forwarder is bounded: it
// answers only sources inside the bridge's subnet, relays only
// well-formed standard queries with one question (at most MaxQuery bytes),
// rate-limits each source (token bucket), caps in-flight UDP queries and TCP
// connections, and puts a deadline on every wait.
package dnsfwd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"
)

// Limits.
const (
	// MaxQuery bounds a query (UDP datagram or TCP message) from a guest.
	MaxQuery = 4096
	// maxReply bounds a reply read from an upstream.
	maxReply = 65535
	// MaxInflight caps UDP queries being relayed at once; more are dropped.
	MaxInflight = 64
	// MaxTCPConns caps guest TCP connections at once; more are closed.
	MaxTCPConns = 16
	// maxQueriesPerTCPConn bounds the queries on one TCP connection.
	maxQueriesPerTCPConn = 32
	// Rate and Burst are each source's token bucket (queries per second).
	Rate  = 50
	Burst = 100
	// maxSources bounds the rate limiter's table.
	maxSources = 4096
	// UpstreamTimeout bounds each upstream's answer; tcpIdle a guest's
	// next TCP message.
	UpstreamTimeout = 2 * time.Second
	tcpIdle         = 5 * time.Second
	maxResolvConf   = 64 << 10
	maxUpstreams    = 3
)

// Config describes a forwarder.
type Config struct {
	// Listen is the address to serve on (the bridge's gateway address);
	// Port defaults to 53.
	Listen netip.Addr
	Port   int
	// Clients is the only source range answered (the bridge's subnet).
	Clients netip.Prefix
	// ResolvConf names the host's resolver configuration (default
	// /etc/resolv.conf); it is re-read when it changes.
	ResolvConf string
	Logger     *slog.Logger
}

// Forwarder is a running forwarder.
type Forwarder struct {
	cfg      Config
	udp      *net.UDPConn
	tcp      *net.TCPListener
	inflight chan struct{}
	tcpSlots chan struct{}
	limiter  *limiter
	ups      *upstreams
	wg       sync.WaitGroup
	closed   chan struct{}
	once     sync.Once
}

// Start listens on cfg.Listen (UDP and TCP) and serves until Close.
func Start(cfg Config) (*Forwarder, error) {
	if !cfg.Listen.Is4() || !cfg.Clients.IsValid() {
		return nil, fmt.Errorf("dns forwarder: need an IPv4 listen address and a client range, got %s and %s", cfg.Listen, cfg.Clients)
	}
	if cfg.Port == 0 {
		cfg.Port = 53
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = "/etc/resolv.conf"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ap := netip.AddrPortFrom(cfg.Listen, uint16(cfg.Port))
	u, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return nil, fmt.Errorf("dns forwarder: listen on udp %s: %w", ap, err)
	}
	t, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(cfg.Listen, uint16(u.LocalAddr().(*net.UDPAddr).Port))))
	if err != nil {
		u.Close()
		return nil, fmt.Errorf("dns forwarder: listen on tcp %s: %w", ap, err)
	}
	f := &Forwarder{
		cfg: cfg, udp: u, tcp: t,
		inflight: make(chan struct{}, MaxInflight),
		tcpSlots: make(chan struct{}, MaxTCPConns),
		limiter:  newLimiter(Rate, Burst, maxSources),
		ups:      &upstreams{path: cfg.ResolvConf, self: cfg.Listen},
		closed:   make(chan struct{}),
	}
	f.wg.Add(2)
	go f.serveUDP()
	go f.serveTCP()
	return f, nil
}

// Addr is where the forwarder listens.
func (f *Forwarder) Addr() netip.AddrPort {
	return f.udp.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Close stops the forwarder and waits for its goroutines.
func (f *Forwarder) Close() error {
	f.once.Do(func() {
		close(f.closed)
		f.udp.Close()
		f.tcp.Close()
	})
	f.wg.Wait()
	return nil
}

func (f *Forwarder) allowed(a netip.Addr) bool {
	a = a.Unmap()
	return f.cfg.Clients.Contains(a) && f.limiter.allow(a, time.Now())
}

func (f *Forwarder) serveUDP() {
	defer f.wg.Done()
	buf := make([]byte, MaxQuery+1)
	for {
		n, src, err := f.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-f.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if n > MaxQuery || !ValidQuery(buf[:n]) || !f.allowed(src.Addr()) {
			continue
		}
		select {
		case f.inflight <- struct{}{}:
		default:
			continue // too many at once: drop, the guest retries
		}
		q := append([]byte(nil), buf[:n]...)
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() { <-f.inflight }()
			reply := f.relay(q, false)
			if len(reply) > 0 {
				f.udp.WriteToUDPAddrPort(reply, src)
			}
		}()
	}
}

func (f *Forwarder) serveTCP() {
	defer f.wg.Done()
	for {
		c, err := f.tcp.AcceptTCP()
		if err != nil {
			select {
			case <-f.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: do not spin
			continue
		}
		src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		if !f.cfg.Clients.Contains(src.Unmap()) {
			c.Close()
			continue
		}
		select {
		case f.tcpSlots <- struct{}{}:
		default:
			c.Close()
			continue
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() { <-f.tcpSlots }()
			defer c.Close()
			f.serveConn(c, src)
		}()
	}
}

func (f *Forwarder) serveConn(c *net.TCPConn, src netip.Addr) {
	stop := context.AfterFunc(closedCtx(f.closed), func() { c.Close() })
	defer stop()
	r := bufio.NewReaderSize(c, 512)
	for range maxQueriesPerTCPConn {
		c.SetDeadline(time.Now().Add(tcpIdle))
		q, err := readMsg(r, MaxQuery)
		if err != nil || !ValidQuery(q) || !f.allowed(src) {
			return
		}
		reply := f.relay(q, true)
		if len(reply) == 0 {
			return
		}
		c.SetDeadline(time.Now().Add(tcpIdle))
		if err := writeMsg(c, reply); err != nil {
			return
		}
	}
}

func closedCtx(ch <-chan struct{}) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-ch; cancel() }()
	return ctx
}

// readMsg reads one length-prefixed DNS message of at most max bytes.
func readMsg(r io.Reader, max int) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(l[:]))
	if n > max {
		return nil, fmt.Errorf("message of %d bytes exceeds %d", n, max)
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}

func writeMsg(w io.Writer, m []byte) error {
	b := make([]byte, 2+len(m))
	binary.BigEndian.PutUint16(b, uint16(len(m)))
	copy(b[2:], m)
	_, err := w.Write(b)
	return err
}

// ValidQuery reports whether b is a DNS standard query (QR 0, opcode
// QUERY) with exactly one question; anything else is not relayed.
func ValidQuery(b []byte) bool {
	if len(b) < 12 || len(b) > MaxQuery {
		return false
	}
	if b[2]&0x80 != 0 || (b[2]>>3)&0x0f != 0 {
		return false
	}
	return binary.BigEndian.Uint16(b[4:6]) == 1 && binary.BigEndian.Uint16(b[6:8]) == 0 && binary.BigEndian.Uint16(b[8:10]) == 0
}

// validReply reports whether b answers q (same id, QR set).
func validReply(q, b []byte) bool {
	return len(b) >= 12 && b[0] == q[0] && b[1] == q[1] && b[2]&0x80 != 0
}

// servfail is the reply when no upstream answers: q's header with QR, RA
// and RCODE 2, and no sections.
func servfail(q []byte) []byte {
	r := make([]byte, 12)
	copy(r, q[:4])
	r[2] = 0x80 | q[2]&0x01 // QR, keep RD
	r[3] = 0x80 | 2         // RA, SERVFAIL
	return r
}

// relay asks the host's name servers in turn and returns the first valid
// reply (SERVFAIL when none answers).
func (f *Forwarder) relay(q []byte, tcp bool) []byte {
	for _, up := range f.ups.get() {
		var r []byte
		var err error
		if tcp {
			r, err = askTCP(up, q)
		} else {
			r, err = askUDP(up, q)
		}
		if err == nil && validReply(q, r) {
			return r
		}
		select {
		case <-f.closed:
			return nil
		default:
		}
	}
	return servfail(q)
}

func askUDP(up netip.AddrPort, q []byte) ([]byte, error) {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(up))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(UpstreamTimeout))
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, maxReply)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		if validReply(q, buf[:n]) {
			return append([]byte(nil), buf[:n]...), nil
		}
	}
}

func askTCP(up netip.AddrPort, q []byte) ([]byte, error) {
	d := net.Dialer{Timeout: UpstreamTimeout}
	c, err := d.Dial("tcp", up.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(UpstreamTimeout))
	if err := writeMsg(c, q); err != nil {
		return nil, err
	}
	return readMsg(c, maxReply)
}

// upstreams are the host's name servers, re-read from resolv.conf when it
// changes (checked at most once a second).
type upstreams struct {
	path string
	self netip.Addr

	mu      sync.Mutex
	checked time.Time
	mtime   time.Time
	size    int64
	list    []netip.AddrPort
}

func (u *upstreams) get() []netip.AddrPort {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	if now.Sub(u.checked) < time.Second && u.checked.After(time.Time{}) {
		return u.list
	}
	u.checked = now
	fi, err := os.Stat(u.path)
	if err != nil {
		u.list = nil
		return nil
	}
	if fi.ModTime().Equal(u.mtime) && fi.Size() == u.size && u.list != nil {
		return u.list
	}
	u.mtime, u.size = fi.ModTime(), fi.Size()
	u.list = ParseResolvConf(readLimited(u.path, maxResolvConf), u.self)
	return u.list
}

func readLimited(path string, max int64) string {
	fh, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer fh.Close()
	b, _ := io.ReadAll(io.LimitReader(fh, max))
	return string(b)
}

// ParseResolvConf returns the first few "nameserver" addresses of a
// resolv.conf (port 53), leaving out self (no loops) and unspecified
// addresses.
func ParseResolvConf(s string, self netip.Addr) []netip.AddrPort {
	var out []netip.AddrPort
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || a.IsUnspecified() || a.Unmap() == self {
			continue
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
		if len(out) == maxUpstreams {
			break
		}
	}
	return out
}

// limiter is a token bucket per source address.
type limiter struct {
	rate, burst float64
	max         int
	mu          sync.Mutex
	m           map[netip.Addr]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate, burst float64, max int) *limiter {
	return &limiter{rate: rate, burst: burst, max: max, m: map[netip.Addr]*bucket{}}
}

func (l *limiter) allow(a netip.Addr, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.m[a]
	if b == nil {
		if len(l.m) >= l.max {
			clear(l.m) // sources are one /24: this only bounds memory
		}
		b = &bucket{tokens: l.burst, last: now}
		l.m[a] = b
	}
	b.tokens += now.Sub(b.last).Seconds() * l.rate
	if b.tokens > l.burst {
		b.tokens = l.burst
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
