package api

// Method names. Params and results are named after each constant.
const (
	// MethodPing takes no params and returns the string "pong".
	MethodPing = "system.ping"
	// MethodInfo takes no params and returns Info.
	MethodInfo = "system.info"
	// MethodDoctor takes no params and returns DoctorResult.
	MethodDoctor = "system.doctor"

	// MethodVMList takes no params and returns []*VM, newest first.
	MethodVMList = "vm.list"
	// MethodVMGet takes VMRef and returns *VM.
	MethodVMGet = "vm.get"
	// MethodVMCreateBegin takes CreateParams and returns CreateStatus at once;
	// the create goes on in bangerd, followed with MethodVMCreateStatus.
	MethodVMCreateBegin = "vm.create.begin"
	// MethodVMCreateStatus takes CreateStatusParams and returns CreateStatus.
	MethodVMCreateStatus = "vm.create.status"
	// MethodVMStart takes VMRef and returns *VM.
	MethodVMStart = "vm.start"
	// MethodVMStop takes StopParams and returns *VM.
	MethodVMStop = "vm.stop"
	// MethodVMRestart takes StopParams and returns *VM.
	MethodVMRestart = "vm.restart"
	// MethodVMKill takes VMRef and returns *VM.
	MethodVMKill = "vm.kill"
	// MethodVMDelete takes DeleteParams and returns DeleteResult.
	MethodVMDelete = "vm.delete"
	// MethodVMSet takes SetParams and returns SetResult.
	MethodVMSet = "vm.set"
	// MethodVMConnect takes VMRef and returns ConnectResult; the connection
	// is then upgraded to the guest agent's SSH server.
	MethodVMConnect = "vm.connect"
	// MethodVMBulk takes BulkParams and returns BulkResult; the connection is
	// then upgraded to an authenticated bulk stream to the guest agent
	// (unencrypted: see internal/agent/bulk), starting with its Open frame.
	MethodVMBulk = "vm.bulk"
	// MethodVMLogs takes LogsParams and returns LogsResult.
	MethodVMLogs = "vm.logs"
	// MethodVMPorts takes VMRef and returns PortsResult.
	MethodVMPorts = "vm.ports"
	// MethodVMStats takes StatsParams and returns StatsResult.
	MethodVMStats = "vm.stats"
	// MethodVMSSHConfig takes SSHConfigParams and returns SSHConfigResult.
	MethodVMSSHConfig = "vm.ssh_config"

	// MethodKernelImport takes KernelImportParams and returns *Kernel.
	MethodKernelImport = "kernel.import"
	// MethodKernelList takes no params and returns []*Kernel.
	MethodKernelList = "kernel.list"
	// MethodKernelDelete takes NameRef and returns DeleteResult.
	MethodKernelDelete = "kernel.delete"

	// MethodImageImport takes ImageImportParams and returns *Image (it waits).
	MethodImageImport = "image.import"
	// MethodImagePull takes ImageOpParams and returns *Image (it waits).
	MethodImagePull = "image.pull"
	// MethodImagePullBegin, MethodImageImportBegin and MethodImageBuildBegin
	// take ImageOpParams and return ImageOpStatus at once; the operation goes
	// on in bangerd, followed with MethodImageOpStatus.
	MethodImagePullBegin   = "image.pull.begin"
	MethodImageImportBegin = "image.import.begin"
	MethodImageBuildBegin  = "image.build.begin"
	// MethodImageOpStatus takes ImageOpStatusParams and returns ImageOpStatus.
	MethodImageOpStatus = "image.op.status"
	// MethodImageConfig takes NameRef and returns ImageConfig.
	MethodImageConfig = "image.config"
	// MethodImageList takes no params and returns []*Image.
	MethodImageList = "image.list"
	// MethodImageDelete takes NameRef and returns DeleteResult.
	MethodImageDelete = "image.delete"
)
