package nettest

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Nft runs fn on an nftables connection in the host namespace and flushes
// what fn queued (tests stand in for other firewalls with it).
func (e *Env) Nft(fn func(c *nftables.Conn)) error {
	return e.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		fn(c)
		return c.Flush()
	})
}

// DockerForwardDrop installs what Docker (iptables-nft) leaves in the host
// namespace: table ip filter with FORWARD policy drop and, with withUser,
// a DOCKER-USER chain FORWARD jumps to.
func (e *Env) DockerForwardDrop(withUser bool) error {
	err := e.Nft(func(c *nftables.Conn) {
		tb := c.AddTable(&nftables.Table{Name: "filter", Family: nftables.TableFamilyIPv4})
		pol := nftables.ChainPolicyDrop
		fwd := c.AddChain(&nftables.Chain{Name: "FORWARD", Table: tb, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &pol})
		if withUser {
			c.AddChain(&nftables.Chain{Name: "DOCKER-USER", Table: tb})
			c.AddRule(&nftables.Rule{Table: tb, Chain: fwd, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "DOCKER-USER"}}})
		}
	})
	if err != nil {
		return fmt.Errorf("install Docker-style FORWARD drop: %w", err)
	}
	return nil
}
