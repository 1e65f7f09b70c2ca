package api

// Info is the result of system.info.
type Info struct {
	Version       string  `json:"version"`
	PID           int     `json:"pid"`
	Home          string  `json:"home"`
	Socket        string  `json:"socket"`
	UptimeSeconds float64 `json:"uptime_seconds"`
	StartedAt     string  `json:"started_at"`
}

// Check is one line of system.doctor.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// DoctorResult is system.doctor's result.
type DoctorResult struct {
	Driver       string  `json:"driver"`
	DriverReason string  `json:"driver_reason"`
	Checks       []Check `json:"checks"`
}
