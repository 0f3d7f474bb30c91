"""Reporting: the run report (one JSON document per run), and tables and figures from many."""
