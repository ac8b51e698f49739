"""Ansible playbooks and roles for vTPU nodes, and the ansible-runner wrapper (runner.run_job)."""
