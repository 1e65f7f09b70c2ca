package fcspec

import (
	"context"
	"strings"
	"sync"
	"testing"
)

var (
	specOnce sync.Once
	spec     *Spec
	specSkip string
	specErr  error
)

func loadSpec(t testing.TB) *Spec {
	t.Helper()
	specOnce.Do(func() {
		var p string
		p, specSkip, specErr = Locate(context.Background())
		if specErr != nil || specSkip != "" {
			return
		}
		spec, specErr = Load(p)
	})
	if specErr != nil {
		t.Fatalf("firecracker API spec: %v", specErr)
	}
	if specSkip != "" {
		t.Skip(specSkip)
	}
	return spec
}

func TestLoadPinnedSpec(t *testing.T) {
	s := loadSpec(t)
	if s.Version != "1.16.1" {
		t.Errorf("spec version = %q, want 1.16.1", s.Version)
	}
	// The operations the driver relies on, and the boot phase the spec gives them.
	for _, tc := range []struct {
		method, path string
		pre, post    bool
	}{
		{"GET", "/", false, false},
		{"PUT", "/actions", false, false},
		{"PUT", "/logger", false, false},
		{"PUT", "/metrics", false, false},
		{"PUT", "/machine-config", true, false},
		{"PUT", "/boot-source", true, false},
		{"PUT", "/drives/rootfs", true, false},
		{"PATCH", "/drives/rootfs", false, true},
		{"PUT", "/network-interfaces/eth0", true, false},
		{"PATCH", "/network-interfaces/eth0", false, true},
		{"PUT", "/vsock", true, false},
		{"PUT", "/balloon", true, false},
		{"PUT", "/snapshot/create", false, true},
	} {
		op, _, err := s.Match(tc.method, tc.path)
		if err != nil {
			t.Errorf("%s %s: %v", tc.method, tc.path, err)
			continue
		}
		if op.PreBootOnly() != tc.pre || op.PostBootOnly() != tc.post {
			t.Errorf("%s %s: pre-boot-only=%v post-boot-only=%v, want %v %v", tc.method, tc.path, op.PreBootOnly(), op.PostBootOnly(), tc.pre, tc.post)
		}
	}
}

func TestMatch(t *testing.T) {
	s := loadSpec(t)
	for _, tc := range []struct {
		method, path string
		tmpl         string
		params       map[string]string
		err          string
	}{
		{"PUT", "/drives/root_0", "/drives/{drive_id}", map[string]string{"drive_id": "root_0"}, ""},
		{"put", "/network-interfaces/eth0", "/network-interfaces/{iface_id}", map[string]string{"iface_id": "eth0"}, ""},
		{"GET", "/", "/", nil, ""},
		{"GET", "/?x=1", "/", nil, ""},
		{"PUT", "/drives", "", nil, "no such API path"},
		{"PUT", "/drives/a/b", "", nil, "no such API path"},
		{"DELETE", "/drives/a", "", nil, "method not allowed"},
		{"POST", "/actions", "", nil, "method not allowed"},
		{"PUT", "/nonsense", "", nil, "no such API path"},
	} {
		op, params, err := s.Match(tc.method, tc.path)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s %s: err = %v, want %q", tc.method, tc.path, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s %s: %v", tc.method, tc.path, err)
			continue
		}
		if op.Template != tc.tmpl {
			t.Errorf("%s %s: template %q, want %q", tc.method, tc.path, op.Template, tc.tmpl)
		}
		for k, v := range tc.params {
			if params[k] != v {
				t.Errorf("%s %s: param %s = %q, want %q", tc.method, tc.path, k, params[k], v)
			}
		}
	}
}

// TestCheckRequest is the validator's self-test: good bodies pass, and each
// kind of deviation from the spec is flagged with the offending field.
func TestCheckRequest(t *testing.T) {
	s := loadSpec(t)
	for _, tc := range []struct {
		name         string
		method, path string
		body         string
		want         string // substring of a problem; "" = valid
	}{
		{"boot source ok", "PUT", "/boot-source", `{"kernel_image_path":"/k","initrd_path":"/i","boot_args":"console=ttyS0"}`, ""},
		{"machine config ok", "PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256,"smt":false}`, ""},
		{"drive ok", "PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r","is_root_device":false,"is_read_only":true}`, ""},
		{"net ok", "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}`, ""},
		{"vsock ok", "PUT", "/vsock", `{"guest_cid":3,"uds_path":"/v.sock"}`, ""},
		{"logger ok", "PUT", "/logger", `{"log_path":"/l","level":"Info","show_level":true,"show_log_origin":false}`, ""},
		{"action ok", "PUT", "/actions", `{"action_type":"InstanceStart"}`, ""},
		{"get ok", "GET", "/", ``, ""},
		{"mmds is open", "PUT", "/mmds", `{"anything":{"goes":[1,2]}}`, ""},
		{"nested ok", "PUT", "/drives/d", `{"drive_id":"d","path_on_host":"/r","is_root_device":false,"is_read_only":false,"rate_limiter":{"bandwidth":{"size":1,"refill_time":100}}}`, ""},
		{"cpu template ok", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"T2"}`, ""},

		{"missing required", "PUT", "/boot-source", `{"boot_args":"x"}`, "kernel_image_path: missing required field"},
		{"missing required drive flag", "PUT", "/drives/d", `{"drive_id":"d","path_on_host":"/r"}`, "is_root_device: missing required field"},
		{"wrong type string", "PUT", "/boot-source", `{"kernel_image_path":5}`, "kernel_image_path: expected a string"},
		{"wrong type integer", "PUT", "/machine-config", `{"vcpu_count":"2","mem_size_mib":256}`, "vcpu_count: expected an integer"},
		{"fraction is no integer", "PUT", "/machine-config", `{"vcpu_count":1.5,"mem_size_mib":256}`, "vcpu_count: expected an integer"},
		{"wrong type boolean", "PUT", "/drives/d", `{"drive_id":"d","path_on_host":"/r","is_root_device":"false","is_read_only":true}`, "is_root_device: expected a boolean"},
		{"wrong type object", "PUT", "/vsock", `[]`, "expected an object"},
		{"null", "PUT", "/boot-source", `{"kernel_image_path":null}`, "kernel_image_path: null is not allowed"},
		{"bad enum", "PUT", "/actions", `{"action_type":"Reboot"}`, `"Reboot" is not one of`},
		{"bad enum via ref", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"T9"}`, "cpu_template"},
		{"bad enum logger level", "PUT", "/logger", `{"level":"Verbose"}`, "level"},
		{"case-insensitive enum", "PUT", "/logger", `{"level":"warning"}`, ""},
		{"case-sensitive enum", "PUT", "/actions", `{"action_type":"instancestart"}`, "is not one of"},
		{"unknown field", "PUT", "/boot-source", `{"kernel_image_path":"/k","kernel_args":"x"}`, "kernel_args: unknown field"},
		{"unknown nested field", "PUT", "/drives/d", `{"drive_id":"d","path_on_host":"/r","is_root_device":false,"is_read_only":false,"rate_limiter":{"bandwidth":{"size":1,"refill_time":1,"burst":2}}}`, "rate_limiter.bandwidth.burst: unknown field"},
		{"below minimum", "PUT", "/vsock", `{"guest_cid":2,"uds_path":"/v"}`, "guest_cid: 2 is below the minimum 3"},
		{"above maximum", "PUT", "/machine-config", `{"vcpu_count":64,"mem_size_mib":128}`, "vcpu_count: 64 is above the maximum 32"},
		{"missing body", "PUT", "/boot-source", ``, "missing request body"},
		{"body on GET", "GET", "/", `{}`, "takes no body"},
		{"not json", "PUT", "/vsock", `{guest_cid:3}`, "not valid JSON"},
		{"trailing data", "PUT", "/actions", `{"action_type":"InstanceStart"} {}`, "trailing data"},
		{"unknown path", "PUT", "/boot", `{}`, "no such API path"},
		{"wrong method", "POST", "/boot-source", `{}`, "method not allowed"},
		{"too big", "PUT", "/mmds", `{"x":"` + strings.Repeat("a", MaxBody) + `"}`, "exceeds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, probs := s.CheckRequest(tc.method, tc.path, []byte(tc.body))
			if tc.want == "" {
				if len(probs) != 0 {
					t.Fatalf("valid request flagged: %v", probs)
				}
				return
			}
			for _, p := range probs {
				if strings.Contains(p.String(), tc.want) {
					return
				}
			}
			t.Fatalf("problems %v do not mention %q", probs, tc.want)
		})
	}
}

func TestCheckDefinition(t *testing.T) {
	s := loadSpec(t)
	if p := s.CheckDefinition("InstanceInfo", []byte(`{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.16.1"}`)); len(p) != 0 {
		t.Errorf("valid InstanceInfo flagged: %v", p)
	}
	if p := s.CheckDefinition("InstanceInfo", []byte(`{"app_name":"Firecracker","id":"x","state":"running","vmm_version":"1.16.1"}`)); len(p) == 0 {
		t.Errorf("bad InstanceInfo state not flagged")
	}
	if p := s.CheckDefinition("NoSuch", []byte(`{}`)); len(p) == 0 {
		t.Errorf("unknown definition not flagged")
	}
}

func TestParseRejectsBadSpecs(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"not yaml", "\t:::", "parse yaml"},
		{"not swagger 2", "openapi: 3.0.0\n", "not a Swagger 2.0"},
		{"empty", "swagger: \"2.0\"\n", "no paths"},
		{"dangling ref", "swagger: \"2.0\"\npaths:\n  /a:\n    put:\n      parameters:\n        - name: b\n          in: body\n          schema:\n            $ref: \"#/definitions/Nope\"\ndefinitions:\n  X:\n    type: object\n", "unknown definition"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func FuzzCheckRequest(f *testing.F) {
	for _, seed := range []struct{ m, p, b string }{
		{"PUT", "/boot-source", `{"kernel_image_path":"/k"}`},
		{"PUT", "/drives/x", `{"drive_id":"x","is_root_device":false,"rate_limiter":{"ops":{"size":1,"refill_time":1}}}`},
		{"PUT", "/machine-config", `{"vcpu_count":18446744073709551616,"mem_size_mib":-1}`},
		{"PATCH", "/mmds", `{"a":[null,{"b":1e400}]}`},
		{"GET", "//", ``},
		{"PUT", "/actions", `[{"action_type":null}]`},
	} {
		f.Add(seed.m, seed.p, []byte(seed.b))
	}
	s := loadSpec(f)
	f.Fuzz(func(t *testing.T, method, path string, body []byte) {
		op, _, probs := s.CheckRequest(method, path, body)
		if op == nil && len(probs) == 0 {
			t.Fatalf("unmatched request without a problem: %s %s", method, path)
		}
	})
}
