package persist

import (
	"embed"
	"strings"
)

// The shared wallet's Redis scripts, one file each under lua/ (what each
// takes and answers is written beside its variable): readable and checkable
// as Lua, embedded in the binary.
//
//go:embed lua/*.lua
var luaFiles embed.FS

// luaScript returns the source of lua/<name>.lua with each ${NAME} in it
// replaced: vars are pairs of NAME and value (Go constants the script
// shares). A missing file or a placeholder left unreplaced panics at package
// initialisation, as a syntax error would fail the build.
func luaScript(name string, vars ...string) string {
	b, err := luaFiles.ReadFile("lua/" + name + ".lua")
	if err != nil {
		panic("persist: " + err.Error())
	}
	pairs := make([]string, 0, len(vars))
	for i := 0; i+1 < len(vars); i += 2 {
		pairs = append(pairs, "${"+vars[i]+"}", vars[i+1])
	}
	src := strings.NewReplacer(pairs...).Replace(string(b))
	if strings.Contains(src, "${") {
		panic("persist: lua/" + name + ".lua: a placeholder is not replaced")
	}
	return src
}
