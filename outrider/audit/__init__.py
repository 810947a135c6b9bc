"""`outrider audit`: the evidence an auditor asks for, from metrics and the CA's audit log.

build.py is the pure core: an Evidence (model.py: raw samples from Prometheus
or saved scrapes, CA audit log lines) in, an Audit answering the five
questions out. The writers (report_json, report_html) turn an Audit into
files; sources.py reads the evidence and command.py runs it all: the only
parts that do I/O. docs/audit.md says what each answer means.
"""
