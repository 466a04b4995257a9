package node

import "testing"

func TestTheHostsCgroupRootAndBpfFilesystemAreTheNodesOwn(t *testing.T) {
	const node, bpf = "/sys/fs/cgroup/kt-node-1", "/state/kt-node-1.bpf"
	own := ownRoots{cgroup: node, bpf: bpf}
	for _, c := range []struct{ in, want string }{
		{"/sys/fs/cgroup", node},
		{"/sys/fs/cgroup/", node},
		{"/sys/fs/cgroup/kubepods", node + "/kubepods"},
		{"/sys/fs/cgroupx", "/sys/fs/cgroupx"},
		{"/sys/fs/bpf", bpf},
		{"/sys/fs/bpf/kt-router", bpf + "/kt-router"},
		{"/sys/fs/bpfx", "/sys/fs/bpfx"},
		{"/var/log", "/var/log"},
	} {
		if got := hostPath(c.in, own); got != c.want {
			t.Errorf("hostPath(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	if got := hostPath("/sys/fs/bpf/x", ownRoots{cgroup: node}); got != "/sys/fs/bpf/x" {
		t.Errorf("without a bpf filesystem of its own the node uses the machine's, got %q", got)
	}
}
