"""The demo: its data, seeding the demo programs, and simulated reviewers for the loop."""
