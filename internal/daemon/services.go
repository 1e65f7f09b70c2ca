package daemon

import "context"

// initServices builds the services the daemon composes.
func (d *Daemon) initServices(ctx context.Context) error { return nil }

// registerServiceAPI registers the services' RPC methods.
func (d *Daemon) registerServiceAPI() {}
