// health-check runs the Argo CD health scripts in health/ the way Argo CD runs them (gopher-lua, with
// only the libraries a script from argocd-cm gets) and computes kstatus (sigs.k8s.io/cli-utils, what
// Flux uses) for the same objects.
//
//	health-check test <health dir>              every <group>/<Kind>/health_test.yaml, as Argo CD's own test does
//	health-check assess <health dir> <file>...  one JSON line per object: Argo CD's and kstatus' verdict
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

// Verdict is what a tool says about an object's health.
type Verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type healthTests struct {
	Tests []struct {
		HealthStatus Verdict `json:"healthStatus"`
		InputPath    string  `json:"inputPath"`
	} `json:"tests"`
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: health-check test <health dir> | assess <health dir> <file>...")
	}
	dir := os.Args[2]
	switch os.Args[1] {
	case "test":
		if err := runTests(dir); err != nil {
			fail(err.Error())
		}
	case "assess":
		for _, file := range os.Args[3:] {
			line, err := assess(dir, file)
			if err != nil {
				fail(fmt.Sprintf("%s: %v", file, err))
			}
			fmt.Println(line)
		}
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "health-check:", message)
	os.Exit(1)
}

func runTests(dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*", "*", "health_test.yaml"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no */*/health_test.yaml under %s", dir)
	}
	failed, count := 0, 0
	for _, file := range files {
		var tests healthTests
		if err := readYAML(file, &tests); err != nil {
			return err
		}
		script, err := os.ReadFile(filepath.Join(filepath.Dir(file), "health.lua"))
		if err != nil {
			return err
		}
		for _, test := range tests.Tests {
			count++
			obj, err := readObject(filepath.Join(filepath.Dir(file), test.InputPath))
			if err != nil {
				return err
			}
			got, err := argoHealth(obj, string(script))
			if err != nil {
				return fmt.Errorf("%s %s: %v", file, test.InputPath, err)
			}
			if got != test.HealthStatus {
				failed++
				fmt.Printf("FAIL %s %s: want %+v, got %+v\n", filepath.Dir(file), test.InputPath, test.HealthStatus, got)
			}
		}
	}
	fmt.Printf("health-check: %d of %d Argo CD health tests passed in %d files\n", count-failed, count, len(files))
	if failed > 0 {
		return fmt.Errorf("%d failed", failed)
	}
	return nil
}

func assess(dir, file string) (string, error) {
	obj, err := readObject(file)
	if err != nil {
		return "", err
	}
	gvk := obj.GroupVersionKind()
	script, err := os.ReadFile(filepath.Join(dir, gvk.Group, gvk.Kind, "health.lua"))
	if err != nil {
		return "", err
	}
	argo, err := argoHealth(obj, string(script))
	if err != nil {
		return "", err
	}
	computed, err := status.Compute(obj)
	if err != nil {
		return "", err
	}
	line, err := json.Marshal(map[string]any{
		"file":    file,
		"argocd":  argo,
		"kstatus": Verdict{Status: computed.Status.String(), Message: computed.Message},
	})
	return string(line), err
}

// argoHealth runs a health script as Argo CD runs one from argocd-cm: a fresh state without the
// standard libraries but package, base and table, a one-second deadline, the object as global `obj`.
func argoHealth(obj *unstructured.Unstructured, script string) (Verdict, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for name, open := range map[string]lua.LGFunction{
		lua.LoadLibName: lua.OpenPackage, lua.BaseLibName: lua.OpenBase, lua.TabLibName: lua.OpenTable,
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(open), Protect: true}, lua.LString(name)); err != nil {
			return Verdict{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return Verdict{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return Verdict{}, fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	verdict := Verdict{Status: lua.LVAsString(table.RawGetString("status")), Message: lua.LVAsString(table.RawGetString("message"))}
	switch verdict.Status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
		return verdict, nil
	}
	return Verdict{}, fmt.Errorf("the script returned the status %q, which Argo CD does not know", verdict.Status)
}

// toLua converts a decoded object the way Argo CD does (numbers become Lua numbers).
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		array := l.CreateTable(len(v), 0)
		for _, item := range v {
			array.Append(toLua(l, item))
		}
		return array
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

func readObject(file string) (*unstructured.Unstructured, error) {
	obj := map[string]any{}
	if err := readYAML(file, &obj); err != nil {
		return nil, err
	}
	// Through JSON, as the API server's objects reach Argo CD and kstatus: integers as int64.
	data, err := json.Marshal(obj)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{}
	return u, u.UnmarshalJSON(data)
}

func readYAML(file string, into any) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(data, into); err != nil {
		return fmt.Errorf("%s: %v", file, err)
	}
	return nil
}
