#!/usr/bin/env python3
"""Summarise a nextest JUnit report: list the tests that printed SKIPPED (they pass, but did
not run their check on this host) and end with one plain line: 'tests: N passed, N failed,
N skipped'. Exit status 1 if any test failed."""
import re
import sys
import xml.etree.ElementTree as ET

path = sys.argv[1]
root = ET.parse(path).getroot()
passed = failed = skipped = 0
skip_lines = []
for case in root.iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        failed += 1
        continue
    text = "".join((e.text or "") for e in case if e.tag in ("system-out", "system-err"))
    reasons = re.findall(r"^SKIPPED .*$", text, re.M)
    if reasons:
        skipped += 1
        skip_lines.extend(reasons)
    else:
        passed += 1
for line in skip_lines:
    print(line)
print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
