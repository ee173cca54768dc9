"""Run the chart's Argo CD health check (helm/sftjob-operator/argocd/health.lua) in a real Lua 5.1 (lupa),
set up the way Argo CD's VM sets up gopher-lua: only the base, package, table and (safe) os libraries are
open (argo-cd util/lua/lua.go: lua.NewState(SkipOpenLibs) + OpenPackage/OpenBase/OpenTable/OpenSafeOs),
the resource is the global `obj`, and the chunk returns the health table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lupa import lua51  # Argo CD's gopher-lua implements Lua 5.1

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "helm" / "sftjob-operator" / "argocd" / "health.lua"
ARGOCD_CM_KEY = "resource.customizations.health.sft.tuning.dev_SFTJob"
# Argo CD turns any other status into Unknown ("Lua returned an invalid health status").
VALID = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
# Libraries Argo CD does not open: a script that uses them works here but fails in Argo CD.
NOT_OPEN_IN_ARGOCD = ("string", "math", "io", "debug", "coroutine")


def _to_lua(rt: Any, value: Any) -> Any:
    """JSON -> Lua the way Argo CD's decodeValue does: objects and arrays become tables (arrays 1-based),
    JSON null becomes nil (the key is absent)."""
    if isinstance(value, dict):
        return rt.table_from({k: _to_lua(rt, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return rt.table_from([_to_lua(rt, v) for v in value if v is not None])
    return value


def health(obj: dict[str, Any], script: str | None = None) -> dict[str, str]:
    """{"status": ..., "message": ...} as Argo CD would compute it for `obj`."""
    rt = lua51.LuaRuntime(unpack_returned_tuples=True, register_eval=False)
    g = rt.globals()
    for lib in NOT_OPEN_IN_ARGOCD:
        g[lib] = None
    g["obj"] = _to_lua(rt, obj)
    result = rt.execute(script if script is not None else HEALTH_LUA.read_text())
    assert result is not None and rt.eval("type")(result) == "table", f"health.lua returned {result!r}"
    out = {"status": str(result["status"]), "message": str(result["message"] or "")}
    assert out["status"] in VALID, out
    return out
