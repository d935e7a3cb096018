"""A TCP proxy adding latency to every request, in a process of its own: `python latency_proxy.py TARGET_PORT LISTEN_PORT SECONDS`."""

import signal
import sys
import threading

from uploads_consumer.embedded import TcpProxy

if __name__ == "__main__":
    target, port, latency = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    proxy = TcpProxy(target, port=port, latency=latency)
    proxy.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    proxy.stop()
