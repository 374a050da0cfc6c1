"""The signup app: users, the verification mail through the outbox, and the verify link."""
