// Command kt-cluster is the testbed's control plane in one multi-call binary, in the manner of
// the old hyperkube: the component is chosen by the name it is invoked as (a symlink) or by
// the first argument.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	// The CoreDNS plugins a cluster DNS needs, and nothing that pulls in cloud SDKs.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// corednsDirectives is the plugin order CoreDNS's own plugin.cfg gives, limited to the
// plugins compiled in above.
var corednsDirectives = []string{
	"reload", "bind", "health", "ready", "errors", "log", "hosts", "kubernetes", "loadbalance",
	"cache", "loop", "forward",
}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args
	if name == "kt-cluster" {
		if len(os.Args) < 2 {
			fmt.Fprintln(os.Stderr, "usage: kt-cluster COMPONENT [args...]\n  components: etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl coredns")
			os.Exit(2)
		}
		name = os.Args[1]
		args = os.Args[1:]
	}
	os.Args = args
	var cmd *cobra.Command
	switch name {
	case "etcd":
		etcdmain.Main(args)
		return
	case "coredns":
		dnsserver.Directives = corednsDirectives
		coremain.Run()
		return
	case "kubectl":
		command := kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	case "kube-apiserver":
		cmd = apiserver.NewAPIServerCommand()
	case "kube-controller-manager":
		cmd = controllermanager.NewControllerManagerCommand()
	case "kube-scheduler":
		cmd = scheduler.NewSchedulerCommand()
	case "kube-proxy":
		cmd = proxy.NewProxyCommand()
	default:
		fmt.Fprintf(os.Stderr, "kt-cluster: unknown component %q\n", name)
		os.Exit(2)
	}
	os.Exit(cli.Run(cmd))
}
