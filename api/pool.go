package api

// Ready pool methods.
const (
	// MethodPoolList takes no params and returns []*Pool.
	MethodPoolList = "pool.list"
	// MethodPoolSet takes PoolSpec and returns *Pool: the pool of that spec
	// is kept at Size ready VMs (0 empties it).
	MethodPoolSet = "pool.set"
)

// PoolSpec names a pool: the spec of the VMs it keeps ready (as `banger
// run` would create them) and how many. Empty image and kernel mean the
// defaults; zero sizes mean run's defaults.
type PoolSpec struct {
	Image     string `json:"image,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	DiskMiB   int    `json:"disk_mib,omitempty"`
	Size      int    `json:"size"`
}

// Pool is a pool and its VMs now.
type Pool struct {
	PoolSpec
	Ready    int      `json:"ready"`              // running, unclaimed
	Starting int      `json:"starting,omitempty"` // being made
	VMs      []string `json:"vms,omitempty"`
	// Note says why the pool is below its size, when it is (the memory budget).
	Note string `json:"note,omitempty"`
}

// VMListParams is vm.list's optional params.
type VMListParams struct {
	// All includes the ready pool's unclaimed VMs.
	All bool `json:"all,omitempty"`
}
