package vmmproc

import "syscall"

// noFollow: the console log is never opened through a symlink.
const noFollow = syscall.O_NOFOLLOW
