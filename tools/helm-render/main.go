// helm-render renders a Helm chart the way `helm template` does, for CI on
// machines without helm: Go's text/template with the sprig functions and
// Helm's own (include, tpl, toYaml, fromYaml, required, fail), .Values merged
// from values.yaml and -f files, .Chart from Chart.yaml, .Release.
//
//	helm-render [-f values.yaml]... [--notes] CHART_DIR
//
// Missing values render as "<no value>" (not silently empty) so tests catch
// them; with --notes it renders templates/NOTES.txt instead of the manifests.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

func readYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return out, nil
}

// merge copies src over dst, recursing into maps (helm's -f semantics).
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func toYAML(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func main() {
	var files valueFiles
	flag.Var(&files, "f", "values file (repeatable; later ones win)")
	notes := flag.Bool("notes", false, "render templates/NOTES.txt")
	release := flag.String("name", "kvstrata", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm-render [-f values.yaml]... [--notes] CHART_DIR")
		os.Exit(2)
	}
	chartDir := flag.Arg(0)
	chart, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	check(err)
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	check(err)
	for _, f := range files {
		extra, err := readYAML(f)
		check(err)
		values = merge(values, extra)
	}
	data := map[string]interface{}{
		"Values": values,
		"Chart": map[string]interface{}{
			"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"],
		},
		"Release": map[string]interface{}{
			"Name": *release, "Namespace": *namespace, "Service": "Helm", "IsInstall": true,
			"IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": "v1.28.0", "Major": "1", "Minor": "28"},
		},
	}

	root := template.New("chart").Option("missingkey=default")
	funcs := sprig.TxtFuncMap()
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		out := map[string]interface{}{}
		_ = yaml.Unmarshal([]byte(s), &out)
		return out
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("required: %s", msg)
		}
		return v, nil
	}
	funcs["fail"] = func(msg string) (string, error) { return "", fmt.Errorf("fail: %s", msg) }
	funcs["include"] = func(name string, d interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, d)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, d interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, d)
		return buf.String(), err
	}
	root.Funcs(funcs)

	// Templates are named as Helm names them ("<chart>/templates/<file>"), so
	// `include (print $.Template.BasePath "/x.yaml") .` works as in helm.
	chartName := fmt.Sprint(chart["name"])
	basePath := chartName + "/templates"
	data["Template"] = map[string]interface{}{"BasePath": basePath, "Name": ""}
	paths, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	check(err)
	sort.Strings(paths)
	for _, p := range paths {
		text, err := os.ReadFile(p)
		check(err)
		_, err = root.New(basePath + "/" + filepath.Base(p)).Parse(string(text))
		check(err)
	}
	for _, p := range paths {
		base := filepath.Base(p)
		isNotes := base == "NOTES.txt"
		if strings.HasPrefix(base, "_") || isNotes != *notes {
			continue
		}
		var buf bytes.Buffer
		data["Template"].(map[string]interface{})["Name"] = basePath + "/" + base
		check(root.ExecuteTemplate(&buf, basePath+"/"+base, data))
		out := strings.TrimSpace(buf.String())
		if out == "" {
			continue
		}
		if !isNotes {
			fmt.Printf("---\n# Source: %s/templates/%s\n", chartName, base)
		}
		fmt.Println(out)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm-render:", err)
		os.Exit(1)
	}
}
