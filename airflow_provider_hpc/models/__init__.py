"""
The services' rules as plain values: what an answer means, what a run's state says, what goes to XCom.

Models know neither HTTP nor Airflow's scheduling: hooks parse answers into them, triggers,
operators and sensors decide and build their events and XCom values with them.
"""
