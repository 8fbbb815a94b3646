"""Alert rules over the metrics, evaluated on the scheduler and sent by notifiers
(hook plugin ``alerts``)."""
