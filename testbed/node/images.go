package node

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// ImageRule says how the testbed runs one family of container images (testbed/images.yaml).
type ImageRule struct {
	Image       string            `json:"image"`
	Description string            `json:"description,omitempty"`
	Entrypoint  []string          `json:"entrypoint,omitempty"`
	Cmd         []string          `json:"cmd,omitempty"`
	Env         map[string]string `json:"env,omitempty"`
	WorkingDir  string            `json:"workingDir,omitempty"`
	Files       map[string]string `json:"files,omitempty"`
}

// ImageTable is the ordered list of rules; the first match wins.
type ImageTable struct {
	Rules []ImageRule
	vars  map[string]string
}

// LoadImageTable reads the table and checks that every pattern is a valid glob.
func LoadImageTable(file string, vars map[string]string) (*ImageTable, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("image table: %w", err)
	}
	var rules []ImageRule
	if err := yaml.UnmarshalStrict(data, &rules); err != nil {
		return nil, fmt.Errorf("image table %s: %w", file, err)
	}
	all := map[string]string{"TESTBED": filepath.Dir(file)}
	for k, v := range vars {
		all[k] = v
	}
	for i, r := range rules {
		if r.Image == "" {
			return nil, fmt.Errorf("image table %s: rule %d has no image pattern", file, i)
		}
		if _, err := path.Match(r.Image, ""); err != nil {
			return nil, fmt.Errorf("image table %s: bad pattern %q: %w", file, r.Image, err)
		}
	}
	return &ImageTable{Rules: rules, vars: all}, nil
}

// NormaliseImage turns an image reference into the form the table's patterns match.
func NormaliseImage(ref string) string {
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	ref = strings.TrimPrefix(ref, "docker.io/library/")
	ref = strings.TrimPrefix(ref, "docker.io/")
	ref = strings.TrimPrefix(ref, "index.docker.io/library/")
	last := ref[strings.LastIndex(ref, "/")+1:]
	if !strings.Contains(last, ":") {
		ref += ":latest"
	}
	return ref
}

// ResolvedImage is a rule with its variables expanded.
type ResolvedImage struct {
	Ref        string
	Entrypoint []string
	Cmd        []string
	Env        map[string]string
	WorkingDir string
	Files      map[string]string
}

// Resolve finds the rule for an image, or says why there is none.
func (t *ImageTable) Resolve(image string) (*ResolvedImage, error) {
	norm := NormaliseImage(image)
	for _, r := range t.Rules {
		if ok, _ := path.Match(r.Image, norm); !ok {
			continue
		}
		out := &ResolvedImage{Ref: norm, Env: map[string]string{}, Files: map[string]string{}, WorkingDir: r.WorkingDir}
		for _, s := range r.Entrypoint {
			out.Entrypoint = append(out.Entrypoint, t.expand(s))
		}
		for _, s := range r.Cmd {
			out.Cmd = append(out.Cmd, t.expand(s))
		}
		for k, v := range r.Env {
			out.Env[k] = t.expand(v)
		}
		for k, v := range r.Files {
			out.Files[k] = t.expand(v)
		}
		return out, nil
	}
	return nil, fmt.Errorf("image %q (%s) is not in the testbed's image table (testbed/images.yaml); the testbed pulls no images", image, norm)
}

func (t *ImageTable) expand(s string) string {
	return os.Expand(s, func(k string) string {
		if v, ok := t.vars[k]; ok {
			return v
		}
		return "${" + k + "}"
	})
}
