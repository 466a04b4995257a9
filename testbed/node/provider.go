// Package node is the testbed's node agent: a virtual-kubelet provider that runs each pod's
// containers as processes in the pod's own network namespace (a veth to the node's namespace,
// an IP from the node's pod CIDR) and mount namespace (a private overlay root).
//
// Layout: provider.go (the virtual-kubelet provider and the pod table), pod.go (one pod's
// lifecycle and status), container.go (one container's processes and logs), probe.go
// (readiness and liveness), exec.go (exec, logs, port-forward), network.go, volumes.go,
// images.go, podinit.go (the helper that builds a container's root and execs its program).
package node

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
)

// Config is everything the agent is told on its command line.
type Config struct {
	NodeName      string
	NodeIP        string
	PodCIDR       string
	StateDir      string // pods' volumes, logs and scratch folders
	CgroupDir     string // the node's cgroup; pods get children of it
	BpfDir        string // the node's bpf filesystem, for hostPath /sys/fs/bpf ("": the machine's)
	ClusterDNS    string
	ClusterDomain string
	SelfExe       string // this binary, for pod-init and exec
	Images        *ImageTable
	Client        kubernetes.Interface
	Recorder      record.EventRecorder
}

// Provider implements virtual-kubelet's nodeutil.Provider and node.PodNotifier.
type Provider struct {
	cfg        Config
	net        *PodNetwork
	hostMounts []string

	mu     sync.Mutex
	pods   map[string]*podRuntime // namespace/name -> runtime
	notify func(*corev1.Pod)
}

// NewProvider checks the node's environment (cgroup, state folder, pod CIDR).
func NewProvider(cfg Config) (*Provider, error) {
	pn, err := NewPodNetwork(cfg.PodCIDR)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, err
	}
	if st, err := os.Stat(cfg.CgroupDir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("node cgroup %s: not a folder (%v)", cfg.CgroupDir, err)
	}
	if err := enterKubeletCgroup(cfg.CgroupDir); err != nil {
		return nil, err
	}
	hm, err := topLevelMounts()
	if err != nil {
		return nil, err
	}
	return &Provider{cfg: cfg, net: pn, hostMounts: hm, pods: map[string]*podRuntime{}, notify: func(*corev1.Pod) {}}, nil
}

// KubeletCgroup is where a systemd node runs its kubelet, relative to the node's cgroup root.
const KubeletCgroup = "system.slice/kubelet.service"

// enterKubeletCgroup moves this process (the node's kubelet) where a real node's kubelet
// lives, so that what looks at cgroups on a node (the router leaves the kubelet's probes and
// port-forwards alone) finds it there.
func enterKubeletCgroup(root string) error {
	dir := filepath.Join(root, KubeletCgroup)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("kubelet cgroup: %w", err)
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0o644); err != nil {
		return fmt.Errorf("entering the kubelet cgroup %s: %w", dir, err)
	}
	return nil
}

// topLevelMounts lists the machine's mounts directly under / that a container's root (an
// overlay of the root filesystem alone) must get by bind mount; /proc, /sys and /dev are
// handled on their own.
func topLevelMounts() ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	rootID := ""
	type m struct{ id, parent, point string }
	var all []m
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		all = append(all, m{f[0], f[1], f[4]})
		if f[4] == "/" {
			rootID = f[0]
		}
	}
	seen := map[string]bool{}
	var out []string
	for _, x := range all {
		if x.parent != rootID || x.point == "/" || seen[x.point] {
			continue
		}
		skip := false
		for _, p := range []string{"/proc", "/sys", "/dev"} {
			if x.point == p || strings.HasPrefix(x.point, p+"/") {
				skip = true
			}
		}
		if !skip {
			seen[x.point] = true
			out = append(out, x.point)
		}
	}
	sort.Strings(out)
	return out, nil
}

func podKey(ns, name string) string { return ns + "/" + name }

// NotifyPods registers virtual-kubelet's status callback.
func (p *Provider) NotifyPods(_ context.Context, f func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = f
	p.mu.Unlock()
}

func (p *Provider) publish(pod *corev1.Pod) {
	p.mu.Lock()
	f := p.notify
	p.mu.Unlock()
	f(pod)
}

// CreatePod starts the pod's lifecycle in the background; progress shows in its status.
func (p *Provider) CreatePod(_ context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	if old, ok := p.pods[key]; ok && old.pod.UID == pod.UID {
		p.mu.Unlock()
		return nil
	}
	rt := newPodRuntime(p, pod.DeepCopy())
	p.pods[key] = rt
	p.mu.Unlock()
	go rt.run()
	return nil
}

// UpdatePod accepts the few in-place changes Kubernetes allows (images are not among those the
// testbed honours) and republishes the status.
func (p *Provider) UpdatePod(_ context.Context, pod *corev1.Pod) error {
	rt := p.lookup(pod.Namespace, pod.Name)
	if rt == nil {
		return errdefs.NotFoundf("pod %s/%s is not on this node", pod.Namespace, pod.Name)
	}
	rt.mu.Lock()
	rt.pod.Labels = pod.Labels
	rt.pod.Annotations = pod.Annotations
	rt.mu.Unlock()
	rt.changed()
	return nil
}

// DeletePod stops the containers (SIGTERM, then SIGKILL after the grace period), removes the
// pod's namespaces and files, and publishes the terminal status.
func (p *Provider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	rt, ok := p.pods[key]
	p.mu.Unlock()
	if !ok {
		return errdefs.NotFoundf("pod %s is not on this node", key)
	}
	rt.terminate(ctx)
	p.mu.Lock()
	if p.pods[key] == rt {
		delete(p.pods, key)
	}
	p.mu.Unlock()
	if pod.DeletionTimestamp != nil {
		// As the kubelet does once the containers are gone: the final delete, so the object
		// does not linger for the rest of its grace period.
		go func() {
			zero := int64(0)
			uid := pod.UID
			err := p.cfg.Client.CoreV1().Pods(pod.Namespace).Delete(context.Background(), pod.Name,
				metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
				rt.event(corev1.EventTypeWarning, "FailedDelete", "final delete: %v", err)
			}
		}()
	}
	return nil
}

func (p *Provider) lookup(ns, name string) *podRuntime {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pods[podKey(ns, name)]
}

// GetPod returns the pod with its current status.
func (p *Provider) GetPod(_ context.Context, ns, name string) (*corev1.Pod, error) {
	rt := p.lookup(ns, name)
	if rt == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not on this node", ns, name)
	}
	return rt.snapshot(), nil
}

// GetPodStatus returns the pod's current status.
func (p *Provider) GetPodStatus(ctx context.Context, ns, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, ns, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

// GetPods lists every pod on the node.
func (p *Provider) GetPods(context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	rts := make([]*podRuntime, 0, len(p.pods))
	for _, rt := range p.pods {
		rts = append(rts, rt)
	}
	p.mu.Unlock()
	out := make([]*corev1.Pod, 0, len(rts))
	for _, rt := range rts {
		out = append(out, rt.snapshot())
	}
	return out, nil
}

// GetContainerLogs serves `kubectl logs`.
func (p *Provider) GetContainerLogs(ctx context.Context, ns, name, container string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	c, err := p.container(ns, name, container)
	if err != nil {
		return nil, err
	}
	return c.logs(ctx, opts)
}

// AttachToContainer is `kubectl attach`; the testbed's containers have no attachable stdin.
func (p *Provider) AttachToContainer(context.Context, string, string, string, api.AttachIO) error {
	return errdefs.InvalidInput("kubectl attach is not supported by the testbed node; use kubectl exec or kubectl logs -f")
}

// GetStatsSummary reports per-pod CPU time from the pods' cgroups.
func (p *Provider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	pods, _ := p.GetPods(context.Background())
	s := &statsv1alpha1.Summary{Node: statsv1alpha1.NodeStats{NodeName: p.cfg.NodeName}}
	now := metav1.Now()
	for _, pod := range pods {
		rt := p.lookup(pod.Namespace, pod.Name)
		if rt == nil {
			continue
		}
		usage := rt.cpuUsageNanos()
		s.Pods = append(s.Pods, statsv1alpha1.PodStats{
			PodRef:    statsv1alpha1.PodReference{Name: pod.Name, Namespace: pod.Namespace, UID: string(pod.UID)},
			StartTime: metav1.NewTime(rt.startTime),
			CPU:       &statsv1alpha1.CPUStats{Time: now, UsageCoreNanoSeconds: &usage},
		})
	}
	return s, nil
}

// GetMetricsResource has no metrics to offer beyond the summary.
func (p *Provider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return []*dto.MetricFamily{}, nil
}

func (p *Provider) container(ns, name, container string) (*containerRuntime, error) {
	rt := p.lookup(ns, name)
	if rt == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not on this node", ns, name)
	}
	c := rt.find(container)
	if c == nil {
		return nil, errdefs.NotFoundf("pod %s/%s has no container %q", ns, name, container)
	}
	return c, nil
}
