"""`outrider audit`: the evidence an auditor asks for, from metrics and the CA's audit log.

model.py is the pure core: raw samples (from Prometheus or saved scrapes) and
CA audit log lines in, an `Audit` answering the five questions out. The
writers (report_json, report_html) turn an Audit into files; sources.py is
the only part that does I/O. docs/audit.md says what each answer means.
"""
