/* The frame codec (docs/internals/supervisor-protocol.md, "Frames"): outgoing frames are built in
 * place in a connection's output queue; incoming payloads are read through a bounds-checked
 * cursor. The numbers are in protocol.h. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "supervisor.h"

/* ---- Outgoing frames ------------------------------------------------------------------- */

/* Room for a frame with up to `maxpayload` bytes; returns where the payload goes. */
uint8_t *frame_begin(struct conn *c, size_t maxpayload) {
    return buf_reserve(&c->out, HDR + maxpayload) + HDR;
}

void frame_end(struct conn *c, uint8_t type, uint32_t id, size_t n) {
    uint8_t *h = c->out.d + c->out.len;
    put32(h, (uint32_t)(5 + n));
    h[4] = type;
    put32(h + 5, id);
    buf_commit(&c->out, HDR + n);
}

void send_frame(struct conn *c, uint8_t type, uint32_t id, const void *p, size_t n) {
    if (c->dead) return;
    uint8_t *d = frame_begin(c, n);
    if (n) memcpy(d, p, n);
    frame_end(c, type, id, n);
}

void send_u32(struct conn *c, uint8_t type, uint32_t id, uint32_t v) {
    uint8_t p[4];
    put32(p, v);
    send_frame(c, type, id, p, 4);
}

/* ERROR: i32 errno | str message. Terminal for `id`. */
void send_error(struct conn *c, uint32_t id, int err, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    uint8_t *d = frame_begin(c, 8 + (size_t)n);
    put32(d, (uint32_t)err);
    put32(d + 4, (uint32_t)n);
    memcpy(d + 8, msg, (size_t)n);
    frame_end(c, F_ERROR, id, 8 + (size_t)n);
}

/* ---- Incoming frames ------------------------------------------------------------------- */

uint32_t rd_u32(struct rd *r) {
    if (r->n < 4) { r->bad = 1; return 0; }
    uint32_t v = get32(r->p);
    r->p += 4, r->n -= 4;
    return v;
}

uint64_t rd_u64(struct rd *r) {
    uint64_t lo = rd_u32(r), hi = rd_u32(r);
    return lo | hi << 32;
}

uint16_t rd_u16(struct rd *r) {
    if (r->n < 2) { r->bad = 1; return 0; }
    uint16_t v = (uint16_t)(r->p[0] | r->p[1] << 8);
    r->p += 2, r->n -= 2;
    return v;
}

/* A str as a new NUL-terminated string; *nul is set if it contains a NUL byte. */
char *rd_str(struct rd *r, int *nul) {
    uint32_t len = rd_u32(r);
    if (r->bad || len > r->n) { r->bad = 1; return NULL; }
    char *s = xrealloc(NULL, (size_t)len + 1);
    memcpy(s, r->p, len);
    s[len] = 0;
    if (memchr(s, 0, len)) *nul = 1;
    r->p += len, r->n -= len;
    return s;
}

/* A list<str> as a NULL-terminated array. */
char **rd_strlist(struct rd *r, int *nul, size_t *count) {
    uint32_t k = rd_u32(r);
    if (r->bad || k > r->n / 4) { r->bad = 1; return NULL; }
    char **v = xrealloc(NULL, sizeof(char *) * ((size_t)k + 1));
    size_t i = 0;
    for (; i < k && !r->bad; i++) v[i] = rd_str(r, nul);
    if (r->bad) i--;   /* the last one failed and is NULL */
    v[i] = NULL;
    *count = i;
    return v;
}

void strlist_free(char **v) {
    for (size_t i = 0; v && v[i]; i++) free(v[i]);
    free(v);
}

