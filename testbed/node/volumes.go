package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// volumeSet materialises a pod's volumes as folders under the pod's state folder; containers
// bind-mount them.
type volumeSet struct {
	client kubernetes.Interface
	pod    *corev1.Pod
	root   string            // <state>/pods/<uid>/volumes
	own    ownRoots          // the node's stand-ins for host folders
	paths  map[string]string // volume name -> host path (folder, or hostPath target)
}

// ownRoots are the node's own stand-ins for host folders that every real node has one of
// and the simulated nodes, sharing one machine, must not share.
type ownRoots struct {
	cgroup string // plays the host's cgroup v2 root
	bpf    string // plays the host's bpf filesystem ("": the machine's)
}

// Where a real node has its cgroup v2 hierarchy and its bpf filesystem.
const (
	hostCgroupRoot = "/sys/fs/cgroup"
	hostBpfRoot    = "/sys/fs/bpf"
)

// hostPath is the machine's path for a hostPath volume: the node's cgroup stands in for the
// host's cgroup root (a simulated node's pods must never reach the real machine's), its bpf
// filesystem for the host's; every other path is the machine's own.
func hostPath(p string, own ownRoots) string {
	clean := filepath.Clean(p)
	for _, r := range []struct{ host, node string }{{hostCgroupRoot, own.cgroup}, {hostBpfRoot, own.bpf}} {
		if r.node == "" {
			continue
		}
		if clean == r.host {
			return r.node
		}
		if rest, ok := strings.CutPrefix(clean, r.host+"/"); ok {
			return filepath.Join(r.node, rest)
		}
	}
	return p
}

// materialise writes every volume; an error names the volume and is retried by the caller
// (a Secret created just after the Pod is the usual case).
func materialiseVolumes(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, root string, own ownRoots) (map[string]string, error) {
	vs := &volumeSet{client: client, pod: pod, root: root, own: own, paths: map[string]string{}}
	for _, v := range pod.Spec.Volumes {
		if err := vs.one(ctx, v); err != nil {
			return nil, fmt.Errorf("volume %q: %w", v.Name, err)
		}
	}
	return vs.paths, nil
}

func (vs *volumeSet) one(ctx context.Context, v corev1.Volume) error {
	dir := filepath.Join(vs.root, v.Name)
	src := v.VolumeSource
	switch {
	case src.HostPath != nil:
		p := hostPath(src.HostPath.Path, vs.own)
		if src.HostPath.Type != nil && *src.HostPath.Type == corev1.HostPathDirectoryOrCreate {
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("hostPath %s: %w", p, err)
		}
		vs.paths[v.Name] = p
		return nil
	case src.EmptyDir != nil:
		vs.paths[v.Name] = dir
		return os.MkdirAll(dir, 0o777)
	case src.ConfigMap != nil:
		files, err := vs.configMap(ctx, src.ConfigMap.Name, src.ConfigMap.Items, src.ConfigMap.Optional)
		if err != nil {
			return err
		}
		return vs.writeFiles(v.Name, dir, files)
	case src.Secret != nil:
		files, err := vs.secret(ctx, src.Secret.SecretName, src.Secret.Items, src.Secret.Optional)
		if err != nil {
			return err
		}
		return vs.writeFiles(v.Name, dir, files)
	case src.DownwardAPI != nil:
		files, err := vs.downward(src.DownwardAPI.Items)
		if err != nil {
			return err
		}
		return vs.writeFiles(v.Name, dir, files)
	case src.Projected != nil:
		files := map[string][]byte{}
		for _, s := range src.Projected.Sources {
			var part map[string][]byte
			var err error
			switch {
			case s.ServiceAccountToken != nil:
				part, err = vs.token(ctx, s.ServiceAccountToken)
			case s.ConfigMap != nil:
				part, err = vs.configMap(ctx, s.ConfigMap.Name, s.ConfigMap.Items, s.ConfigMap.Optional)
			case s.Secret != nil:
				part, err = vs.secret(ctx, s.Secret.Name, s.Secret.Items, s.Secret.Optional)
			case s.DownwardAPI != nil:
				part, err = vs.downward(s.DownwardAPI.Items)
			default:
				err = fmt.Errorf("projected source kind is not supported by the testbed node")
			}
			if err != nil {
				return err
			}
			for k, b := range part {
				files[k] = b
			}
		}
		return vs.writeFiles(v.Name, dir, files)
	default:
		return fmt.Errorf("this volume type is not supported by the testbed node (emptyDir, hostPath, configMap, secret, downwardAPI and projected are)")
	}
}

func (vs *volumeSet) writeFiles(name, dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	keys := make([]string, 0, len(files))
	for k := range files {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		clean := filepath.Clean(k)
		if filepath.IsAbs(clean) || strings.HasPrefix(clean, "..") {
			return fmt.Errorf("item path %q escapes the volume", k)
		}
		p := filepath.Join(dir, clean)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, files[k], 0o644); err != nil {
			return err
		}
	}
	vs.paths[name] = dir
	return nil
}

func pick(data map[string][]byte, items []corev1.KeyToPath, what string) (map[string][]byte, error) {
	out := map[string][]byte{}
	if len(items) == 0 {
		for k, v := range data {
			out[k] = v
		}
		return out, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			return nil, fmt.Errorf("%s has no key %q", what, it.Key)
		}
		out[it.Path] = v
	}
	return out, nil
}

func (vs *volumeSet) configMap(ctx context.Context, name string, items []corev1.KeyToPath, optional *bool) (map[string][]byte, error) {
	cm, err := vs.client.CoreV1().ConfigMaps(vs.pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("configmap %q: %w", name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return pick(data, items, "configmap "+name)
}

func (vs *volumeSet) secret(ctx context.Context, name string, items []corev1.KeyToPath, optional *bool) (map[string][]byte, error) {
	s, err := vs.client.CoreV1().Secrets(vs.pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("secret %q: %w", name, err)
	}
	return pick(s.Data, items, "secret "+name)
}

func (vs *volumeSet) downward(items []corev1.DownwardAPIVolumeFile) (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, it := range items {
		if it.FieldRef == nil {
			return nil, fmt.Errorf("downwardAPI item %q: only fieldRef is supported by the testbed node", it.Path)
		}
		v, err := podField(vs.pod, it.FieldRef.FieldPath)
		if err != nil {
			return nil, err
		}
		out[it.Path] = []byte(v)
	}
	return out, nil
}

// podField answers the downward API's field paths.
func podField(pod *corev1.Pod, field string) (string, error) {
	kv := func(m map[string]string) string {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		for _, k := range keys {
			fmt.Fprintf(&b, "%s=%q\n", k, m[k])
		}
		return b.String()
	}
	switch field {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return kv(pod.Labels), nil
	case "metadata.annotations":
		return kv(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return pod.Status.PodIP, nil
	case "status.hostIP":
		return pod.Status.HostIP, nil
	}
	if strings.HasPrefix(field, "metadata.labels['") && strings.HasSuffix(field, "']") {
		return pod.Labels[field[len("metadata.labels['"):len(field)-2]], nil
	}
	if strings.HasPrefix(field, "metadata.annotations['") && strings.HasSuffix(field, "']") {
		return pod.Annotations[field[len("metadata.annotations['"):len(field)-2]], nil
	}
	return "", fmt.Errorf("field path %q is not supported by the testbed node", field)
}

func (vs *volumeSet) token(ctx context.Context, src *corev1.ServiceAccountTokenProjection) (map[string][]byte, error) {
	sa := vs.pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	exp := int64(3607)
	if src.ExpirationSeconds != nil {
		exp = *src.ExpirationSeconds
	}
	var aud []string
	if src.Audience != "" {
		aud = []string{src.Audience}
	}
	tr, err := vs.client.CoreV1().ServiceAccounts(vs.pod.Namespace).CreateToken(ctx, sa, &authv1.TokenRequest{
		Spec: authv1.TokenRequestSpec{
			Audiences:         aud,
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: vs.pod.Name, UID: vs.pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("token for serviceaccount %q: %w", sa, err)
	}
	return map[string][]byte{src.Path: []byte(tr.Status.Token)}, nil
}
