// Package examples holds small programs that use banger's Go client
// (package client). Each is its own main package:
//
//   - listvms: list the VMs, like `banger vm ls`.
//   - sandbox: create a VM, run a command in it with an environment
//     variable and a working directory, read back a file it wrote, and
//     delete the VM.
package examples
