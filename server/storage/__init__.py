"""The node's durable state: one Database (connection, lock, migrations, unit of work) and its
repositories.
"""
