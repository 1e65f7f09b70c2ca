package cli

import (
	"reflect"
	"testing"

	"github.com/bangerdev/banger/api"
)

func TestCommandFor(t *testing.T) {
	tests := []struct {
		name string
		ic   api.ImageConfig
		args []string
		want []string
	}{
		{"nothing: shell", api.ImageConfig{}, nil, []string{}},
		{"args only", api.ImageConfig{}, []string{"ls", "-l"}, []string{"ls", "-l"}},
		{"cmd default", api.ImageConfig{Cmd: []string{"nginx", "-g", "daemon off;"}}, nil, []string{"nginx", "-g", "daemon off;"}},
		{"args replace cmd", api.ImageConfig{Cmd: []string{"nginx"}}, []string{"sh"}, []string{"sh"}},
		{"entrypoint + cmd", api.ImageConfig{Entrypoint: []string{"/init.sh"}, Cmd: []string{"serve"}}, nil, []string{"/init.sh", "serve"}},
		{"entrypoint + args", api.ImageConfig{Entrypoint: []string{"/init.sh"}, Cmd: []string{"serve"}}, []string{"test"}, []string{"/init.sh", "test"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := commandFor(tc.ic, tc.args); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}
