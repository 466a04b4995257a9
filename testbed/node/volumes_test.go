package node

import "testing"

func TestTheHostsCgroupRootIsTheNodesCgroup(t *testing.T) {
	const node = "/sys/fs/cgroup/kt-node-1"
	for _, c := range []struct{ in, want string }{
		{"/sys/fs/cgroup", node},
		{"/sys/fs/cgroup/", node},
		{"/sys/fs/cgroup/kubepods", node + "/kubepods"},
		{"/sys/fs/cgroupx", "/sys/fs/cgroupx"},
		{"/var/log", "/var/log"},
	} {
		if got := hostPath(c.in, node); got != c.want {
			t.Errorf("hostPath(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
