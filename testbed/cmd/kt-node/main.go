// Command kt-node is the testbed's node agent (a virtual-kubelet provider that runs pods as
// processes in network namespaces) and its helpers:
//
//	kt-node run --name kt-node-1 ...   the agent
//	kt-node pod-init                   (internal) builds a container's root and execs it
//	kt-node udp-echo --port 9000       the kt-testbed/udp-echo image
//	kt-node http-echo --port 9090 --page TEXT
//	                                   the kt-testbed/http-echo image: HTTP/1.1, h2c and gRPC
//	kt-node dns-probe SERVER NAME      asks SERVER for NAME's A record, exit 0 if answered
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/ktctl/ktctl/testbed/node"
	"github.com/miekg/dns"
	vklog "github.com/virtual-kubelet/virtual-kubelet/log"
	vkslog "github.com/virtual-kubelet/virtual-kubelet/log/slog"
	vknode "github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
)

func init() {
	if len(os.Args) > 1 && os.Args[1] == "pod-init" {
		node.LockMainThread()
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kt-node run|udp-echo|http-echo|dns-probe [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "pod-init":
		node.PodInitMain()
	case "run":
		if err := run(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "kt-node: %v\n", err)
			os.Exit(1)
		}
	case "udp-echo":
		udpEcho(os.Args[2:])
	case "http-echo":
		httpEcho(os.Args[2:])
	case "dns-probe":
		dnsProbe(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "kt-node: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	name := fs.String("name", "kt-node-1", "node name")
	nodeIP := fs.String("node-ip", "", "the node's InternalIP (kubelet API listens there)")
	podCIDR := fs.String("pod-cidr", "", "the node's pod CIDR")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig")
	stateDir := fs.String("state-dir", "", "folder for pods' volumes, logs and scratch")
	cgroup := fs.String("cgroup", "", "the node's cgroup v2 folder")
	bpf := fs.String("bpffs", "", "the node's bpf filesystem (hostPath /sys/fs/bpf); default: the machine's")
	images := fs.String("images", "", "image table (testbed/images.yaml)")
	binDir := fs.String("bin-dir", "", "workspace binaries (${BIN} in the image table)")
	clusterBin := fs.String("cluster-bin", "", "the kt-cluster binary (${KT_CLUSTER})")
	clusterDNS := fs.String("cluster-dns", "10.96.0.10", "cluster DNS Service IP")
	clusterDomain := fs.String("cluster-domain", "cluster.local", "cluster domain")
	certFile := fs.String("tls-cert", "", "kubelet API serving certificate")
	keyFile := fs.String("tls-key", "", "kubelet API serving key")
	caFile := fs.String("client-ca", "", "CA whose client certificates may use the kubelet API")
	version := fs.String("kubelet-version", "v1.37.2", "version reported in the node's status")
	_ = fs.Parse(args)
	for flagName, v := range map[string]string{"node-ip": *nodeIP, "pod-cidr": *podCIDR, "state-dir": *stateDir,
		"cgroup": *cgroup, "images": *images, "tls-cert": *certFile, "tls-key": *keyFile, "client-ca": *caFile} {
		if v == "" {
			return fmt.Errorf("--%s is required", flagName)
		}
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	vklog.L = vkslog.FromSlog(logger)

	rest, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	rest.QPS, rest.Burst = 100, 200
	client, err := kubernetes.NewForConfig(rest)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	table, err := node.LoadImageTable(*images, map[string]string{"BIN": *binDir, "KT_NODE": self, "KT_CLUSTER": *clusterBin})
	if err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster()
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	// Pods' events in this node's log too: they outlive `down` for post-mortems.
	broadcaster.StartStructuredLogging(0)
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: *name})

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return fmt.Errorf("kubelet serving certificate: %w", err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", *caFile)
	}
	// Only the API server (which holds a client certificate of the cluster CA) may exec,
	// read logs or port-forward; the laptop can reach this address but not use it.
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}

	mux := http.NewServeMux()
	// The kubelet's default streaming idle timeout (virtual-kubelet's is 30 s).
	const streamIdle = 4 * time.Hour
	newProvider := func(pc nodeutil.ProviderConfig) (nodeutil.Provider, vknode.NodeProvider, error) {
		p, err := node.NewProvider(node.Config{
			NodeName: *name, NodeIP: *nodeIP, PodCIDR: *podCIDR, StateDir: *stateDir, CgroupDir: *cgroup, BpfDir: *bpf,
			ClusterDNS: *clusterDNS, ClusterDomain: *clusterDomain, SelfExe: self, Images: table,
			Client: client, Recorder: recorder,
		})
		if err != nil {
			return nil, nil, err
		}
		describeNode(pc.Node, *name, *nodeIP, *podCIDR, *version)
		mux.Handle("/portForward/", node.PortForwardHandler(p, streamIdle))
		return p, nil, nil
	}
	n, err := nodeutil.NewNode(*name, newProvider,
		nodeutil.WithClient(client),
		nodeutil.AttachProviderRoutes(mux),
		func(c *nodeutil.NodeConfig) error {
			c.Handler = mux
			c.TLSConfig = tlsCfg
			c.HTTPListenAddr = net.JoinHostPort(*nodeIP, "10250")
			c.NumWorkers = 4
			c.StreamIdleTimeout = streamIdle
			// The agent resolves env itself once the pod has its IP (status.podIP).
			c.SkipDownwardAPIResolution = true
			c.InformerResyncPeriod = time.Minute
			return nil
		},
	)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		if err := n.WaitReady(ctx, 0); err == nil {
			logger.Info("node ready", "node", *name, "ip", *nodeIP, "podCIDR", *podCIDR)
		}
	}()
	return n.Run(ctx)
}

// describeNode fills in the Node object the agent registers.
func describeNode(n *corev1.Node, name, ip, podCIDR, version string) {
	n.Labels["kubernetes.io/os"] = "linux"
	n.Labels["kubernetes.io/arch"] = runtime.GOARCH
	n.Labels["kubernetes.io/hostname"] = name
	n.Labels["node.kubernetes.io/testbed"] = "kt"
	n.Spec.PodCIDR = podCIDR
	n.Spec.PodCIDRs = []string{podCIDR}
	cpus := resource.MustParse(strconv.Itoa(runtime.NumCPU()))
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              cpus,
		corev1.ResourceMemory:           resource.MustParse("16Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("50Gi"),
	}
	n.Status.Capacity = capacity
	n.Status.Allocatable = capacity.DeepCopy()
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: name}}
	n.Status.DaemonEndpoints.KubeletEndpoint.Port = 10250
	n.Status.NodeInfo = corev1.NodeSystemInfo{
		KubeletVersion: version, OperatingSystem: "linux", Architecture: runtime.GOARCH,
		ContainerRuntimeVersion: "kt-testbed://1", OSImage: "kt testbed (processes in network namespaces)",
		KernelVersion: kernelVersion(),
	}
}

func kernelVersion() string {
	var u syscall.Utsname
	if syscall.Uname(&u) != nil {
		return ""
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

func udpEcho(args []string) {
	fs := flag.NewFlagSet("udp-echo", flag.ExitOnError)
	port := fs.Int("port", 9000, "UDP port")
	_ = fs.Parse(args)
	conn, err := net.ListenUDP("udp", &net.UDPAddr{Port: *port})
	if err != nil {
		fmt.Fprintf(os.Stderr, "udp-echo: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("udp-echo listening on :%d\n", *port)
	buf := make([]byte, 65536)
	for {
		n, from, err := conn.ReadFromUDP(buf)
		if err != nil {
			fmt.Fprintf(os.Stderr, "udp-echo: %v\n", err)
			os.Exit(1)
		}
		_, _ = conn.WriteToUDP(buf[:n], from)
	}
}

func dnsProbe(args []string) {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kt-node dns-probe SERVER NAME")
		os.Exit(2)
	}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(args[1]), dns.TypeA)
	c := &dns.Client{Timeout: 2 * time.Second}
	r, _, err := c.Exchange(m, net.JoinHostPort(args[0], "53"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "dns-probe: %v\n", err)
		os.Exit(1)
	}
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
		fmt.Fprintf(os.Stderr, "dns-probe: %s: %s, %d answers\n", args[1], dns.RcodeToString[r.Rcode], len(r.Answer))
		os.Exit(1)
	}
	for _, a := range r.Answer {
		fmt.Println(a.String())
	}
}
