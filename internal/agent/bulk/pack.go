package bulk

// Entry types of a pull's stream (OpPull, see pull.go): for each entry,
// parents first, a FrameRequest (Type PackDir, PackFile, PackLink or
// PackSame, Payload a SyncEntry), a PackFile followed by exactly Size bytes
// in FrameData frames.
const (
	PackDir  = "d"
	PackFile = "f"
	PackLink = "l"
)
