package daemon

import (
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/bangerdev/banger/internal/hostnet"
	"github.com/bangerdev/banger/internal/kernel"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/vmm"

	"github.com/bangerdev/banger/api"
)

func (d *Daemon) registerDoctor() {
	rpc.Handle(d.mux, api.MethodDoctor, d.doctor)
}

func (d *Daemon) doctor(ctx context.Context, _ struct{}) (api.DoctorResult, error) {
	s := d.vms
	res := api.DoctorResult{Driver: s.defDrv}
	switch cfg := d.fileCfg.VMM; {
	case cfg != "" && cfg != "auto":
		res.DriverReason = fmt.Sprintf("configured (vmm=%s)", cfg)
	case s.defDrv == "firecracker":
		res.DriverReason = "firecracker was found on PATH"
	default:
		res.DriverReason = "firecracker is not on PATH, so banger uses qemu"
	}
	add := func(name string, err error, detail string) {
		c := api.Check{Name: name, OK: err == nil, Detail: detail}
		if err != nil {
			c.Detail = err.Error()
		}
		res.Checks = append(res.Checks, c)
	}
	for _, name := range []string{"firecracker", "qemu"} {
		drv := s.drivers[name]
		err := drv.Preflight(ctx)
		detail := "usable"
		if ds, ok := drv.(vmm.Describer); ok {
			detail = strings.Join(ds.DescribeHost(ctx), "; ")
		}
		if err != nil && name != s.defDrv {
			// Not the driver in use: report, do not fail.
			detail, err = "not usable here (banger uses "+s.defDrv+"): "+err.Error(), nil
		}
		add("vmm "+name, err, detail)
	}
	_, err := agentPath()
	add("banger-agent", err, "found")
	for _, tool := range []string{"mkfs.ext4"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			err = fmt.Errorf("%s not found: install e2fsprogs", tool)
		}
		add(tool, err, p)
	}
	if d.fileCfg.Network.Mode == "none" {
		add("network", nil, "disabled in config (network.mode none)")
	} else if pr, err := s.net.client.Ping(ctx); err != nil {
		if d.fileCfg.Network.Mode == "helper" {
			add("network", err, "")
		} else {
			add("network", nil, "banger-helper not reachable, VMs start without a network: "+err.Error())
		}
	} else {
		add("network", nil, fmt.Sprintf("banger-helper answers (bridge %s)", pr.Bridge))
		if lr, err := s.net.client.List(ctx); err == nil && lr.Forward != nil {
			add("guest forwarding", nil, forwardDetail(pr.Bridge, *lr.Forward))
		}
	}
	if ap, err := agentPath(); err != nil {
		add("banger-agent", err, "")
	} else {
		add("banger-agent", kernel.CheckStaticAgent(ap), ap+" (static)")
	}
	fixed, err := d.cfg.Layout.Repair()
	switch {
	case err != nil:
		add("home directories", err, "")
	case len(fixed) > 0:
		add("home directories", nil, "repaired to mode 0700: "+strings.Join(fixed, ", "))
	default:
		add("home directories", nil, "mode 0700")
	}
	ks, _ := d.store.ListKernels(ctx)
	ims, _ := d.store.ListImages(ctx)
	var kerr, ierr error
	if len(ks) == 0 {
		kerr = fmt.Errorf("no kernels: banger kernel import --package linux-image-cloud-amd64")
	}
	if len(ims) == 0 {
		ierr = fmt.Errorf("no images: banger image import ROOTFS.ext4")
	}
	add("kernels", kerr, fmt.Sprintf("%d", len(ks)))
	add("images", ierr, fmt.Sprintf("%d", len(ims)))
	return res, nil
}

// forwardDetail explains what other firewalls do to guests' forwarded
// traffic, with the exact fix when banger cannot apply it itself.
func forwardDetail(bridge string, f hostnet.ForwardInfo) string {
	var parts []string
	switch {
	case f.NftDrop && f.BangerAccepts:
		parts = append(parts, "iptables-nft FORWARD policy is drop (Docker/ufw); banger's accept rules for "+bridge+" are in place")
	case f.NftDrop:
		parts = append(parts, "iptables-nft FORWARD policy is drop (Docker/ufw); banger-helper adds accept rules for "+bridge+" when a VM starts")
	default:
		parts = append(parts, "no iptables-nft FORWARD drop")
	}
	if f.LegacyFilter {
		parts = append(parts, fmt.Sprintf("warning: iptables-legacy's filter table is active and banger cannot see or change it; "+
			"if `sudo iptables-legacy -S FORWARD` shows `-P FORWARD DROP`, guests get no network until you run "+
			"`sudo iptables-legacy -I FORWARD 1 -i %[1]s -j ACCEPT && sudo iptables-legacy -I FORWARD 1 -o %[1]s -j ACCEPT` "+
			"(with Docker, use DOCKER-USER instead of FORWARD)", bridge))
	}
	if f.Firewalld {
		parts = append(parts, fmt.Sprintf("warning: firewalld is active and rejects forwarding for interfaces in no zone that allows it; "+
			"if guests get no network, run `sudo firewall-cmd --permanent --zone=trusted --add-interface=%[1]s && sudo firewall-cmd --reload` "+
			"(banger's own tables still decide what guests reach)", bridge))
	}
	return strings.Join(parts, "; ")
}
