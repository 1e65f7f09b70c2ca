package sshd

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// account is the guest user a session runs as.
type account struct {
	Name   string
	UID    uint32
	GID    uint32
	Home   string
	Shell  string
	Groups []uint32 // supplementary groups
}

// errNoUser means the user does not exist in the guest.
var errNoUser = errors.New("no such user")

// lookupAccount finds name in passwdFile and its supplementary groups in
// groupFile. "root" always exists, even in images without /etc/passwd.
func lookupAccount(passwdFile, groupFile, name string) (account, error) {
	acct, err := findPasswd(passwdFile, name)
	if err != nil {
		if name == "root" && (errors.Is(err, errNoUser) || errors.Is(err, os.ErrNotExist)) {
			return account{Name: "root", Home: "/root", Shell: "/bin/sh"}, nil
		}
		return account{}, err
	}
	acct.Groups = findGroups(groupFile, acct.Name, acct.GID)
	return acct, nil
}

func findPasswd(path, name string) (account, error) {
	f, err := os.Open(path)
	if err != nil {
		return account{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		// name:passwd:uid:gid:gecos:home:shell
		f := strings.Split(line, ":")
		if len(f) < 7 || f[0] != name {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			return account{}, fmt.Errorf("malformed %s entry for %q", path, name)
		}
		return account{Name: name, UID: uint32(uid), GID: uint32(gid), Home: f[5], Shell: f[6]}, nil
	}
	if err := sc.Err(); err != nil {
		return account{}, err
	}
	return account{}, fmt.Errorf("%w %q in %s", errNoUser, name, path)
}

// findGroups lists the GIDs of the groups that name the user as a member,
// plus the primary group.
func findGroups(path, user string, primary uint32) []uint32 {
	groups := []uint32{primary}
	f, err := os.Open(path)
	if err != nil {
		return groups
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:passwd:gid:member,member
		f := strings.Split(sc.Text(), ":")
		if len(f) < 4 {
			continue
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || uint32(gid) == primary {
			continue
		}
		for _, m := range strings.Split(f[3], ",") {
			if m == user {
				groups = append(groups, uint32(gid))
				break
			}
		}
	}
	return groups
}
