package node

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
)

// gatewayIP is the pods' next hop: every host-side veth carries it, so a pod's default route
// is the same on every node (the layout Calico uses; no bridge, a /32 route per pod).
const gatewayIP = "169.254.1.1"

// PodNetwork allocates pod IPs from the node's pod CIDR and plumbs a veth per pod.
type PodNetwork struct {
	mu    sync.Mutex
	cidr  *net.IPNet
	inUse map[string]string // ip -> pod key
	last  uint32            // offset in the CIDR of the address allocated last (0: none yet)
}

// NewPodNetwork makes an allocator for cidr (an IPv4 prefix of at most /30).
func NewPodNetwork(cidr string) (*PodNetwork, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("pod CIDR %q: %w", cidr, err)
	}
	if n.IP.To4() == nil {
		return nil, fmt.Errorf("pod CIDR %q: only IPv4 is supported", cidr)
	}
	if ones, _ := n.Mask.Size(); ones > 30 {
		return nil, fmt.Errorf("pod CIDR %q is too small", cidr)
	}
	return &PodNetwork{cidr: n, inUse: map[string]string{}}, nil
}

// allocate returns the next free address after the one allocated last, wrapping around and
// skipping the network address, .1 and broadcast: round robin, as the CNI host-local IPAM
// does. A freed address is not handed out again at once: the node's conntrack still holds
// the old pod's flows (TIME_WAIT for two minutes), and a new pod with its address would have
// the NAT of new flows to it clash with them (and remap their source ports).
func (p *PodNetwork) allocate(key string) (net.IP, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	base := p.cidr.IP.To4()
	ones, bits := p.cidr.Mask.Size()
	size := uint32(1) << uint(bits-ones)
	b := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	usable := size - 3 // offsets 2 .. size-2
	start := uint32(0)
	if p.last >= 2 {
		start = p.last - 1 // the index of the offset after the last one
	}
	for n := uint32(0); n < usable; n++ {
		off := 2 + (start+n)%usable
		v := b + off
		ip := net.IPv4(byte(v>>24), byte(v>>16), byte(v>>8), byte(v)).To4()
		if _, taken := p.inUse[ip.String()]; !taken {
			p.inUse[ip.String()] = key
			p.last = off
			return ip, nil
		}
	}
	return nil, fmt.Errorf("pod CIDR %s is exhausted", p.cidr)
}

func (p *PodNetwork) release(ip string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.inUse, ip)
}

// podNetNames derives the namespace and host veth names from the pod UID (IFNAMSIZ is 16).
func podNetNames(uid string) (netns, hostVeth string) {
	id := strings.ReplaceAll(uid, "-", "")
	if len(id) > 10 {
		id = id[:10]
	}
	return "ktp-" + id, "ktv" + id
}

// Setup creates the pod's network namespace and veth and returns the pod IP.
func (p *PodNetwork) Setup(key, uid string) (ip net.IP, netns string, err error) {
	netns, veth := podNetNames(uid)
	ip, err = p.allocate(key)
	if err != nil {
		return nil, "", err
	}
	defer func() {
		if err != nil {
			_ = runIP(nil, "netns", "del", netns)
			p.release(ip.String())
		}
	}()
	// A netns left by an earlier attempt for the same pod would make `add` fail.
	_ = runIP(nil, "netns", "del", netns)
	if err = runIP(nil, "netns", "add", netns); err != nil {
		return nil, "", err
	}
	host := fmt.Sprintf(`link add %[1]s type veth peer name eth0 netns %[2]s
link set %[1]s up
addr add %[3]s/32 dev %[1]s scope link
route add %[4]s/32 dev %[1]s scope link
`, veth, netns, gatewayIP, ip)
	if err = runIPBatch(nil, host); err != nil {
		return nil, "", err
	}
	pod := fmt.Sprintf(`link set lo up
addr add %[1]s/32 dev eth0
link set eth0 up
route add %[2]s dev eth0 scope link
route add default via %[2]s dev eth0
`, ip, gatewayIP)
	if err = runIPBatch([]string{"-n", netns}, pod); err != nil {
		return nil, "", err
	}
	return ip, netns, nil
}

// Teardown deletes the namespace (which takes the veth pair and its route with it).
func (p *PodNetwork) Teardown(uid, ip string) error {
	netns, _ := podNetNames(uid)
	err := runIP(nil, "netns", "del", netns)
	if ip != "" {
		p.release(ip)
	}
	if err != nil && strings.Contains(err.Error(), "No such file") {
		return nil
	}
	return err
}

func runIP(prefix []string, args ...string) error {
	all := append(append([]string{}, prefix...), args...)
	out, err := exec.Command("ip", all...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(all, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

func runIPBatch(prefix []string, script string) error {
	args := append(append([]string{}, prefix...), "-batch", "-")
	cmd := exec.Command("ip", args...)
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s (script:\n%s)", strings.Join(args, " "), err, bytes.TrimSpace(out), script)
	}
	return nil
}

// safeSysctls are the network-namespaced sysctls the kubelet allows without
// --allowed-unsafe-sysctls (its "safe" set).
var safeSysctls = map[string]bool{
	"net.ipv4.ip_local_port_range":        true,
	"net.ipv4.ip_unprivileged_port_start": true,
	"net.ipv4.tcp_syncookies":             true,
	"net.ipv4.ping_group_range":           true,
	"net.ipv4.ip_local_reserved_ports":    true,
	"net.ipv4.tcp_keepalive_time":         true,
	"net.ipv4.tcp_fin_timeout":            true,
	"net.ipv4.tcp_keepalive_intvl":        true,
	"net.ipv4.tcp_keepalive_probes":       true,
}

// applySysctls sets a pod's sysctls in its network namespace, as the kubelet does; an unsafe
// one fails the pod, as the kubelet's SysctlForbidden does.
func applySysctls(netns string, sysctls []corev1.Sysctl) error {
	for _, s := range sysctls {
		if !safeSysctls[s.Name] {
			return fmt.Errorf("SysctlForbidden: %s is not a safe sysctl", s.Name)
		}
		path := "/proc/sys/" + strings.ReplaceAll(s.Name, ".", "/")
		out, err := exec.Command("ip", "netns", "exec", netns, "sh", "-c", `printf '%s' "$1" > "$2"`, "sh", s.Value, path).CombinedOutput()
		if err != nil {
			return fmt.Errorf("sysctl %s=%s: %v: %s", s.Name, s.Value, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
