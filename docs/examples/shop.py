# shop.py, with zq: the module above, ported (docs/examples/shop.py)
import zq

# One address, the zq broker's, and no backend: results come back through the
# broker. Here it comes from $ZQ_BROKER (default tcp://127.0.0.1:5555); write
# zq.App("shop", "tcp://10.0.0.5:5555") to fix it in the code.
app = zq.App("shop")


class GatewayDown(Exception):
    """The payment gateway did not answer: worth trying again."""


@app.task
def add(x, y):
    return x + y


@app.task
def total(values):
    return sum(values)


@app.task(
    queue="payments",  # task_routes
    key=lambda order: order["customer_id"],  # new: one charge per customer at a time
    time_limit=120,
    soft_time_limit=90,
    autoretry_for=(GatewayDown,),
    retries=5,  # max_retries
    retry_backoff=True,
)
def charge(order):
    task = zq.current_task()  # bind=True and self.request
    if order.get("gateway_down") and task.retries == 0:
        raise GatewayDown(f"no answer for order {order['id']}")
    return {"order": order["id"], "charged": order["amount"], "retries": task.retries}


@app.task(retries=3, retry_delay=10)  # max_retries, default_retry_delay
def fetch_rate(currency):
    if zq.current_task().retries == 0:  # the first call "times out"
        raise zq.Retry(countdown=0.1, exc=TimeoutError(currency))  # self.retry(...)
    return {"EUR": 1.0, "USD": 1.08}[currency]


@app.task
def refund(order):
    if order["amount"] <= 0:
        raise ValueError(f"nothing to refund on order {order['id']}")
    return -order["amount"]


@app.task
def resize(image_id, sizes):
    task = zq.current_task()
    for done, size in enumerate(sizes, 1):
        task.progress(done, len(sizes), note=f"{size}px")  # self.update_state(...)
    return {"image": image_id, "sizes": sizes}


@app.periodic(cron="0 3 * * *", key="nightly-report")  # beat_schedule, crontab()
@app.task
def nightly_report():
    return "sent"


@app.periodic(every=300)  # beat_schedule, "schedule": 300.0
@app.task
def cleanup():
    return 0
