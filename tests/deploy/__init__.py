"""Deployment: the image, compose, Prometheus and Grafana, install and the adapter store's seeding."""
