"""The demo's summary as plain text: what ``extproc demo`` prints, made from the JSON summary alone."""

from __future__ import annotations

from typing import Any

from extproc.local.demo.traffic import MAX_IN_FLIGHT


def pct(value: float | None, digits: int = 1) -> str:
    """A share in 0..1 as a percentage; "-" for nothing measured."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 1) -> str:
    """A number with ``digits`` decimals; "-" for nothing measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as plain text (what the demo prints), from the JSON summary alone."""
    r = s["requests"]
    head = "summary" + (" (interrupted)" if s["interrupted"] else "")
    out = [
        f"== {head}: {s['duration_s']:.1f} s of traffic at {s['rate_target']:g} req/s: {r['sent']} requests, "
        f"{r['ok']} ok, {r['failed']} failed ==",
        "",
        "requests per route (phases: " + ", ".join(f"{p['name']} {p['requests']}" for p in s["phases"]) + "):",
    ]
    for route in s["by_route"].values():
        out.append(f"  {route['path']:<32} {route['requests']:6d}  ({route['failed']} failed)")
    out += ["", "requests per model (the model that answered) and per replica:"]
    for model, m in s["by_model"].items():
        replicas = [x for x in s["by_replica"].items() if x[1]["pool"] == m["pool"]]
        parts = ", ".join(f"{x['name']} {x['requests']}" for _, x in replicas)
        out.append(f"  {model:<16} {m['requests']:6d}  ({parts})")

    ab = s["ab_split"]
    out += [
        "",
        f"A/B split on {ab['path']}: {ab['independent_requests']} answers without {ab['sticky']['header']}"
        f" (of {ab['requests']} A/B answers)",
    ]
    for pool in ab["weights"]:
        ci = ab["ci95"][pool]
        verdict = {True: "target inside the interval", False: "target OUTSIDE the interval", None: ""}
        out.append(
            f"  {pool:<4} {ab['served'][pool]:5d}  observed {pct(ab['observed_share'][pool])}"
            f"  95% CI [{pct(ci[0] if ci else None)}, {pct(ci[1] if ci else None)}]"
            f"  target {pct(ab['target_share'][pool], 0)}  {verdict[ab['target_in_ci95'][pool]]}"
        )
    st = ab["sticky"]
    if st["users"]:
        by_pool = ", ".join(f"{n} on {p}" for p, n in st["users_by_pool"].items())
        out.append(
            f"  sticky {st['header']}: {st['requests']} requests from {st['users']} users; "
            f"{st['consistent_users']}/{st['users']} always got the same pool ({by_pool})"
        )
    if ab["mismatches"]:
        out.append(f"  {ab['mismatches']} answers whose model and replica disagree")
    ab_route = s["by_route"].get(ab["route"], {})
    if ab_route.get("requests") and not ab["requests"]:
        out.append(f"  no A/B request succeeded ({ab_route['failed']} failed): see the errors at the end")

    out += ["", f"latency, client-side end to end (ms):  {'p50':>7} {'p95':>7} {'p99':>7}   expected (write-up)"]
    for model, m in s["by_model"].items():
        lat = m["latency_ms"]
        exp = m["expected_latency_ms"]
        verdict = {True: "p50 in range", False: "p50 OUT of range", None: ""}[m["p50_in_expected"]]
        exp_text = f"~{exp[0]:g}-{exp[1]:g} ms  {verdict}" if exp else ""
        out.append(f"  {model:<36} {num(lat['p50']):>7} {num(lat['p95']):>7} {num(lat['p99']):>7}   {exp_text}")

    ov = s["routing_overhead"]
    what = {
        "x-gateway-routing-us": "Envoy's x-gateway-routing-us per request: from the last request byte in\n"
        "  to the first byte upstream (ext_proc round trip with the pick, re-route, upstream connection)",
        "client-minus-upstream-service-time": "client e2e minus Envoy's x-envoy-upstream-service-time\n"
        "  (Envoy + ext_proc + the client's HTTP stack; 1 ms resolution)",
        None: "not measured",
    }[ov["source"]]
    verdict = {True: "p95 below target", False: "p95 ABOVE target", None: ""}[ov["p95_below_target"]]
    dec = ov["picker_decision_ms"]
    env = ov["envoy_ms"]
    out += [
        "",
        f"gateway routing overhead (ms): p50 {num(ov['p50_ms'], 2)}  p95 {num(ov['p95_ms'], 2)}"
        f"  target sub-{ov['target_ms']:g} ms  {verdict}",
        f"  measured as {what}",
        f"  the picker's decision alone: p50 {num(dec['p50'], 3)}  p95 {num(dec['p95'], 3)}"
        f"  mean {num(dec['mean'], 3)} ({dec['count']} decisions)",
    ]
    if env["downstream_p50"] is not None:
        ups = ", ".join(f"{p} {num(v)}" for p, v in env["upstream_p50"].items())
        out.append(f"  Envoy's histograms, p50: downstream {num(env['downstream_p50'])}, upstream {ups}")

    out += ["", "prefix-cache hit rate (simulators' /metrics, tokens, summed per pool):"]
    for model, m in s["by_model"].items():
        pc = m["prefix_cache"]
        out.append(
            f"  {model:<16} {pct(pc['hit_rate']):>6}  ({pc['hit_tokens']} of {pc['query_tokens']} prompt tokens;"
            f" responses' cached_tokens: {pct(m['cached_prompt_share'])})"
        )

    me = s["models_endpoint"]
    out += ["", f"GET /v1/models through the gateway: HTTP {me['status']}: {', '.join(me['models']) or '-'}"]
    out.append(f"failed requests: {r['failed']}" + (f" {r['failed_by_status']}" if r["failed"] else ""))
    out += [f"  {e}" for e in r["errors"]]
    if r["not_sent"]:
        out.append(f"not sent (over {MAX_IN_FLIGHT} in flight): {r['not_sent']}")
    return "\n".join(line.rstrip() for line in out)
