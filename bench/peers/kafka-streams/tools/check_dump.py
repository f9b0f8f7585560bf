#!/usr/bin/env python3
"""Independent check of the processor app's `dump` output.

Decodes the records that Export.java wrote (Confluent framing + Avro, with a small
generic decoder over the repository's .avsc files), applies Tripwire's acceptance rules
(validation, time bounds, per-partition duplicates and lateness, as in
connectors/src/avro.rs and connectors/src/partition.rs; floors are not modelled) and
computes the statistics of dataflow/SEMANTICS.md at time T, then compares them with the
dump's lines.

usage: check_dump.py RECORDS.txt DUMP.jsonl [--at T] [--windows 60000,...]
       [--lateness-ms 5000] [--dedup-horizon-ms 3600000] [--tick-ms 1]
Without --at it prints the largest accepted event time (a valid T) and exits.
"""
import argparse, json, math, os, re, struct, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..")


def codes():
    rs = open(os.path.join(ROOT, "connectors", "src", "codes.rs")).read()
    def lst(name):
        m = re.search(r'const ' + name + r':\s*&str\s*=\s*"([^"]*)"', rs, re.S)
        return set(m.group(1).replace("\\", " ").split())
    return lst("CURRENCIES"), lst("COUNTRIES")


def schemas():
    d = os.path.join(ROOT, "schemas")
    man = json.load(open(os.path.join(d, "manifest.json")))
    out = {}
    for s in man["schemas"]:
        sch = json.load(open(os.path.join(d, s["file"])))
        if sch["namespace"] + "." + sch["name"] == "dev.tripwire.Transaction":
            out[s["id"]] = sch
    return out


class Reader:
    def __init__(self, b):
        self.b, self.i = b, 0

    def long(self):
        n = shift = 0
        while True:
            c = self.b[self.i]; self.i += 1
            n |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
            if shift > 63:
                raise ValueError("varint too long")
        return (n >> 1) ^ -(n & 1)

    def double(self):
        if self.i + 8 > len(self.b):
            raise ValueError("eof")
        v = struct.unpack_from("<d", self.b, self.i)[0]; self.i += 8
        return v

    def string(self):
        n = self.long()
        if n < 0 or self.i + n > len(self.b):
            raise ValueError("bad string")
        s = self.b[self.i:self.i + n].decode("utf-8"); self.i += n
        return s

    def value(self, t):
        if isinstance(t, list):
            k = self.long()
            if not 0 <= k < len(t):
                raise ValueError("bad union")
            return self.value(t[k])
        if isinstance(t, dict):
            tt = t["type"]
            if tt == "enum":
                k = self.long()
                if not 0 <= k < len(t["symbols"]):
                    raise ValueError("bad enum")
                return t["symbols"][k]
            if tt == "record":
                return {f["name"]: self.value(f["type"]) for f in t["fields"]}
            return self.value(tt)
        if t in ("long", "int"):
            return self.long()
        if t == "double":
            return self.double()
        if t == "string":
            return self.string()
        if t == "null":
            return None
        raise ValueError("type " + str(t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("records"); ap.add_argument("dump")
    ap.add_argument("--at", type=int)
    ap.add_argument("--windows", default="60000,300000,3600000,86400000")
    ap.add_argument("--lateness-ms", type=int, default=5000)
    ap.add_argument("--dedup-horizon-ms", type=int, default=3600000)
    ap.add_argument("--tick-ms", type=int, default=1)
    a = ap.parse_args()
    windows = sorted(int(w) for w in a.windows.split(","))
    tick = max(a.tick_ms, 1)
    currencies, countries = codes()
    writers = schemas()

    parts = {}
    for line in open(a.records):
        p, off, ts, key, hexv = line.split()
        parts.setdefault(int(p), []).append((int(off), int(ts), bytes.fromhex(hexv)))

    accepted = []  # (card, event_time, amount, merchant, country)
    rejected = 0
    for p, recs in parts.items():
        recs.sort()
        top = basis = None
        seen = {}  # event_id -> (fields, event_time)
        for off, ts, v in recs:
            x = None
            if len(v) <= 65536 and len(v) >= 5 and v[0] == 0:
                sid = struct.unpack(">I", v[1:5])[0]
                if sid in writers:
                    try:
                        r = Reader(v[5:]); x = r.value(writers[sid])
                        if r.i != len(r.b):
                            x = None
                    except (ValueError, IndexError, UnicodeDecodeError):
                        x = None
            ok = x is not None and 1 <= x["amount_minor"] <= 10**12 \
                and math.isfinite(x["lat"]) and -90 <= x["lat"] <= 90 \
                and math.isfinite(x["lon"]) and -180 <= x["lon"] <= 180 \
                and x["currency"] in currencies and x["country"] in countries \
                and 0 <= x["mcc"] <= 9999 and x["event_time"] >= 0
            if ok and ts >= 0:
                e = x["event_time"]
                if e > ts + 5 * 60000 or e < ts - 7 * 86400000:
                    ok = False
            if not ok:
                rejected += 1
                continue
            e = x["event_id"]
            fields = tuple(sorted((k, v2) for k, v2 in x.items() if k != "device_id")) + (("device_id", x.get("device_id")),)
            et = x["event_time"]
            if e in seen and seen[e][1] + a.dedup_horizon_ms >= et:
                rejected += 1  # duplicate (identical) or duplicate_id (different)
                continue
            if basis is not None and et + a.lateness_ms < basis:
                rejected += 1
                continue
            clamped = min(et, ts) if ts >= 0 else et
            if top is None:
                top = clamped
            elif clamped >= top:
                basis, top = top, clamped
            else:
                basis = clamped if basis is None else max(basis, clamped)
            seen[e] = (fields, et)
            accepted.append((x["card_id"], et, x["amount_minor"], x["merchant_id"], x["country"]))

    last = max(e[1] for e in accepted)
    print(f"{sum(len(r) for r in parts.values())} records, {len(accepted)} accepted, {rejected} rejected, "
          f"largest accepted event time {last}", file=sys.stderr)
    if a.at is None:
        print(last)
        return
    t = a.at
    tau = lambda et: -(-et // tick) * tick
    expect = {}
    for card, et, amount, merchant, country in accepted:
        for w in windows:
            if tau(et) <= t < tau(et) + w:
                s = expect.setdefault((card, w), [0, 0, 0, set(), set()])
                s[0] += 1; s[1] += amount; s[2] = max(s[2], amount); s[3].add(merchant); s[4].add(country)
    got = {}
    for line in open(a.dump):
        d = json.loads(line)
        got[(d["card"], d["window"])] = (d["count"], d["sum"], d["max"], d["merchants"], d["countries"])
    want = {k: (s[0], s[1], s[2], len(s[3]), len(s[4])) for k, s in expect.items()}
    bad = [k for k in set(want) | set(got) if want.get(k) != got.get(k)]
    for k in sorted(bad)[:20]:
        print("MISMATCH", k, "expected", want.get(k), "dump", got.get(k))
    print(f"{len(want)} expected statistics, {len(got)} dumped, {len(bad)} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
