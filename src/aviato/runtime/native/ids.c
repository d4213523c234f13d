/* A connection's ids: which exec, file read, file write or port connect an id of that
 * connection names, and whether an id is taken (by any of them: ids are shared). Shared by the
 * frame handlers (exec.c, files.c, ports.c) and the dispatch, below them all. */
#define _GNU_SOURCE
#include <stddef.h>

#include "supervisor.h"

struct exec *exec_find(struct conn *c, uint32_t id) {
    for (struct exec *e = c->execs; e; e = e->next)
        if (e->id == id) return e;
    return NULL;
}

struct rfile **rfile_find(struct conn *c, uint32_t id) {
    struct rfile **pp = &c->reads;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    return pp;
}

struct wfile **wfile_find(struct conn *c, uint32_t id) {
    struct wfile **pp = &c->writes;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    return pp;
}

struct port_connect **port_find(struct conn *c, uint32_t id) {
    struct port_connect **pp = &c->ports;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    return pp;
}

int id_in_use(struct conn *c, uint32_t id) {
    return exec_find(c, id) || *rfile_find(c, id) || *wfile_find(c, id) || *port_find(c, id);
}
