/*
 * sae-server's HTTP side on libmicrohttpd: a thread per connection (a handler may block on its
 * job), the routes, server-sent events, JSON errors and one log line per request.
 */
#ifndef SAE_SERVER_HTTP_H
#define SAE_SERVER_HTTP_H

#include "server.h"

struct MHD_Daemon;

/* Listens on host:port (port 0: any free port, *bound_port says which). Returns the daemon, or
 * NULL with a message in err. */
struct MHD_Daemon *http_start(server *s, const char *host, int port, int max_connections,
                              int *bound_port, char *err, size_t errlen);
/* Graceful stop: closes the listening socket, waits (at most `grace` seconds) for the requests
 * in flight to end, then stops the daemon. */
void http_stop(struct MHD_Daemon *d, server *s, double grace);

#endif
