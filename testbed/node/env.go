package node

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// containerEnv resolves a container's environment as the kubelet does, once the pod's IP is
// known (virtual-kubelet's own resolution runs before that and cannot offer status.podIP):
// service links, envFrom, env with valueFrom (fieldRef, configMapKeyRef, secretKeyRef), and
// $(VAR) references to earlier variables.
func (rt *podRuntime) containerEnv(ctx context.Context, c *corev1.Container) (map[string]string, error) {
	rt.mu.Lock()
	pod := rt.pod.DeepCopy()
	pod.Status.PodIP = rt.podIP
	pod.Status.HostIP = rt.p.cfg.NodeIP
	rt.mu.Unlock()
	env := map[string]string{}
	links, err := rt.serviceLinks(ctx, pod)
	if err != nil {
		return nil, err
	}
	for k, v := range links {
		env[k] = v
	}
	client := rt.p.cfg.Client
	for _, from := range c.EnvFrom {
		var data map[string]string
		switch {
		case from.ConfigMapRef != nil:
			cm, err := client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom configmap %q: %w", from.ConfigMapRef.Name, err)
			}
			data = cm.Data
		case from.SecretRef != nil:
			s, err := client.CoreV1().Secrets(pod.Namespace).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && from.SecretRef.Optional != nil && *from.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom secret %q: %w", from.SecretRef.Name, err)
			}
			data = map[string]string{}
			for k, v := range s.Data {
				data[k] = string(v)
			}
		}
		for k, v := range data {
			env[from.Prefix+k] = v
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			env[e.Name] = expandVars(e.Value, env)
			continue
		}
		vf := e.ValueFrom
		switch {
		case vf.FieldRef != nil:
			v, err := podField(pod, vf.FieldRef.FieldPath)
			if err != nil {
				return nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
			env[e.Name] = v
		case vf.ConfigMapKeyRef != nil:
			ref := vf.ConfigMapKeyRef
			cm, err := client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			v, ok := "", false
			if err == nil {
				v, ok = cm.Data[ref.Key]
			}
			if !ok {
				if ref.Optional != nil && *ref.Optional {
					continue
				}
				return nil, fmt.Errorf("env %s: configmap %q key %q: %v", e.Name, ref.Name, ref.Key, err)
			}
			env[e.Name] = v
		case vf.SecretKeyRef != nil:
			ref := vf.SecretKeyRef
			s, err := client.CoreV1().Secrets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			var v []byte
			ok := false
			if err == nil {
				v, ok = s.Data[ref.Key]
			}
			if !ok {
				if ref.Optional != nil && *ref.Optional {
					continue
				}
				return nil, fmt.Errorf("env %s: secret %q key %q: %v", e.Name, ref.Name, ref.Key, err)
			}
			env[e.Name] = string(v)
		case vf.ResourceFieldRef != nil:
			env[e.Name] = "0"
		}
	}
	return env, nil
}

// serviceLinks are the Docker-link style variables of the namespace's Services, and always
// those of the API server's Service (in-cluster clients read KUBERNETES_SERVICE_HOST).
func (rt *podRuntime) serviceLinks(ctx context.Context, pod *corev1.Pod) (map[string]string, error) {
	client := rt.p.cfg.Client
	var svcs []corev1.Service
	enable := pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks
	if enable {
		list, err := client.CoreV1().Services(pod.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("listing services for the environment: %w", err)
		}
		svcs = list.Items
	}
	if pod.Namespace != "default" || !enable {
		k, err := client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err == nil {
			svcs = append(svcs, *k)
		}
	}
	sort.Slice(svcs, func(i, j int) bool { return svcs[i].Name < svcs[j].Name })
	env := map[string]string{}
	for _, s := range svcs {
		ip := s.Spec.ClusterIP
		if ip == "" || ip == corev1.ClusterIPNone || len(s.Spec.Ports) == 0 {
			continue
		}
		isMaster := s.Namespace == "default" && s.Name == "kubernetes"
		if !enable && !isMaster {
			continue
		}
		name := strings.ToUpper(strings.ReplaceAll(s.Name, "-", "_"))
		first := s.Spec.Ports[0]
		env[name+"_SERVICE_HOST"] = ip
		env[name+"_SERVICE_PORT"] = strconv.Itoa(int(first.Port))
		env[name+"_PORT"] = fmt.Sprintf("%s://%s:%d", strings.ToLower(string(first.Protocol)), ip, first.Port)
		for _, p := range s.Spec.Ports {
			if p.Name != "" {
				env[name+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(p.Name, "-", "_"))] = strconv.Itoa(int(p.Port))
			}
			proto := strings.ToUpper(string(p.Protocol))
			prefix := fmt.Sprintf("%s_PORT_%d_%s", name, p.Port, proto)
			env[prefix] = fmt.Sprintf("%s://%s:%d", strings.ToLower(proto), ip, p.Port)
			env[prefix+"_PROTO"] = strings.ToLower(proto)
			env[prefix+"_PORT"] = strconv.Itoa(int(p.Port))
			env[prefix+"_ADDR"] = ip
		}
	}
	return env, nil
}
