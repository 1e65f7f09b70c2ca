// Package api is banger's wire contract: the names of bangerd's methods and
// the JSON types of their parameters and results. bangerd, the banger CLI
// and the public Go client (package client) all use it; it imports nothing
// but the standard library and banger's guest-agent types.
//
// The protocol itself (one JSON request per line on a unix socket, the
// response, and connection upgrades) is described in docs/API.md.
package api
