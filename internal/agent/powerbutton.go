package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Linux input events (linux/input.h, linux/input-event-codes.h).
const (
	evKey    = 0x01
	keyPower = 116
	// inputEventSize is sizeof(struct input_event) on 64-bit: a struct
	// timeval (16 bytes), type and code (2 bytes each), value (4 bytes).
	inputEventSize = 24
)

// readPowerKey reads input events from r and calls onPress for every press
// of KEY_POWER. It returns when r fails.
func readPowerKey(r io.Reader, onPress func()) error {
	ev := make([]byte, inputEventSize)
	for {
		if _, err := io.ReadFull(r, ev); err != nil {
			return err
		}
		typ := binary.NativeEndian.Uint16(ev[16:])
		code := binary.NativeEndian.Uint16(ev[18:])
		value := int32(binary.NativeEndian.Uint32(ev[20:]))
		if typ == evKey && code == keyPower && value == 1 {
			onPress()
		}
	}
}

// hasKey reports whether a sysfs key capability bitmap ("capabilities/key":
// hex words of the kernel's long size, most significant first) has code set.
func hasKey(bitmap string, code int) bool {
	words := strings.Fields(bitmap)
	const bits = 64
	idx := code / bits
	if idx >= len(words) {
		return false
	}
	w, err := strconv.ParseUint(words[len(words)-1-idx], 16, 64)
	if err != nil {
		return false
	}
	return w&(1<<(code%bits)) != 0
}

// powerButtons lists the input event devices (under devDir) that can send
// KEY_POWER, according to sysClass (normally /sys/class/input).
func powerButtons(sysClass, devDir string) []string {
	caps, _ := filepath.Glob(filepath.Join(sysClass, "event*", "device", "capabilities", "key"))
	var out []string
	for _, c := range caps {
		b, err := os.ReadFile(c)
		if err != nil || !hasKey(string(b), keyPower) {
			continue
		}
		ev := filepath.Base(filepath.Dir(filepath.Dir(filepath.Dir(c))))
		out = append(out, filepath.Join(devDir, ev))
	}
	return out
}

// watchPowerButton calls onPress when the VMM presses the (ACPI) power
// button, watching every input device that has one, until ctx is done. It
// needs the button and evdev modules; without them there is nothing to
// watch and the VMM's power button does nothing.
func watchPowerButton(ctx context.Context, onPress func(), log *slog.Logger) {
	watching := map[string]bool{}
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		for _, dev := range powerButtons("/sys/class/input", "/dev/input") {
			if watching[dev] {
				continue
			}
			f, err := os.Open(dev)
			if err != nil {
				log.Debug("open power button", "device", dev, "error", err)
				continue
			}
			watching[dev] = true
			log.Debug("watching the power button", "device", dev)
			stop := context.AfterFunc(ctx, func() { f.Close() })
			go func() {
				defer stop()
				defer f.Close()
				err := readPowerKey(f, func() {
					log.Info("power button pressed")
					onPress()
				})
				if ctx.Err() == nil && !errors.Is(err, os.ErrClosed) {
					log.Debug("power button device ended", "device", dev, "error", err)
				}
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
