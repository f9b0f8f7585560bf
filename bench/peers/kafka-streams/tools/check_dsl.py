#!/usr/bin/env python3
"""Check the DSL app's output against Tripwire's window statistics.

For an input with no late, duplicate or invalid records (e.g. txgen --bad-per-10k 0
--late-per-10k 0 --fraud-per-10k 0), the last value the DSL app emitted for (card,
window, time) must equal Tripwire's statistics of that card's window at that time over
all the input's events (dataflow/SEMANTICS.md, tick 1 ms), since out-of-order events
re-emit the later windows they fall into.

usage: check_dsl.py INPUT_RECORDS.txt OUTPUT_RECORDS.txt   (both written by Export.java)
"""
import struct, sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_dump as c

writers = c.schemas()
events = {}
for line in open(sys.argv[1]):
    p, off, ts, key, h = line.split()
    v = bytes.fromhex(h)
    x = c.Reader(v[5:]).value(writers[struct.unpack(">I", v[1:5])[0]])
    events.setdefault(x["card_id"], []).append((x["event_time"], x["amount_minor"], x["merchant_id"], x["country"]))

last = {}
for line in open(sys.argv[2]):
    p, off, ts, key, h = line.split()
    w, t, count, s, mx, m, k = struct.unpack(">iqiqqii", bytes.fromhex(h))
    last[(int(key), w, t)] = (count, s, mx, m, k)

bad = 0
for (card, w, t), got in last.items():
    inw = [e for e in events[card] if e[0] <= t < e[0] + w]
    want = (len(inw), sum(e[1] for e in inw), max(e[1] for e in inw), len({e[2] for e in inw}), len({e[3] for e in inw}))
    if want != got:
        bad += 1
        if bad <= 10:
            print("MISMATCH", card, w, t, "expected", want, "dsl", got)
times = {(card, e[0]) for card, es in events.items() for e in es}
windows = {w for (_, w, _) in last}
missing = [(card, w, t) for (card, t) in times for w in windows if (card, w, t) not in last]
print(f"{len(last)} (card, window, time) values checked, {bad} mismatches; "
      f"{len(missing)} (card, window, event time) without output")
sys.exit(1 if bad or missing else 0)
