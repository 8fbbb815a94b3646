"""Schedulers (entry-point group ``inferno.schedulers``): ``apscheduler``."""
