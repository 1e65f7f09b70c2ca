package daemon

import (
	"os"
	"path/filepath"
	"testing"
)

func TestAgentDigestCache(t *testing.T) {
	src, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs a static binary to stand for the agent (busybox-static): %v", err)
	}
	p := filepath.Join(t.TempDir(), "banger-agent")
	if err := os.WriteFile(p, src, 0o755); err != nil {
		t.Fatal(err)
	}
	var c agentDigestCache
	want, _ := fileDigest(p)
	for i := 0; i < 2; i++ { // hashed, then from the cache
		got, err := c.digest(p)
		if err != nil {
			t.Skipf("busybox is not a static binary here: %v", err)
		}
		if got != want {
			t.Fatalf("digest %s, want %s", got, want)
		}
	}
	// A rewritten agent is checked and hashed again.
	if err := os.WriteFile(p, append(src, 0), 0o755); err != nil {
		t.Fatal(err)
	}
	want2, _ := fileDigest(p)
	if got, err := c.digest(p); err != nil || got != want2 || got == want {
		t.Fatalf("after a rewrite: %s, %v; want %s", got, err, want2)
	}
	// A replaced, non-static file is refused, not served from the cache.
	bad := filepath.Join(t.TempDir(), "x")
	os.WriteFile(bad, []byte("#!/bin/sh\n"), 0o755)
	if err := os.Rename(bad, p); err != nil {
		t.Fatal(err)
	}
	if _, err := c.digest(p); err == nil {
		t.Fatal("a replaced agent that is not a static binary was accepted from the cache")
	}
}
