# Declarations of the engine's public header, utp/core/utp.h, for Cython.
#
# Only what the binding uses or may use is typed precisely; the header itself
# is the authority (Cython emits #include "utp.h", so the C compiler checks
# every use against the real declarations).

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    int AF_INET
    int AF_INET6
    int SHUT_WR

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    int INET6_ADDRSTRLEN
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)
    unsigned int htonl(unsigned int)
    unsigned int ntohl(unsigned int)

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "utp.h" nogil:
    ctypedef unsigned char byte
    ctypedef unsigned char uint8
    ctypedef unsigned short uint16
    ctypedef unsigned int uint32
    ctypedef signed int int32
    ctypedef unsigned long long uint64
    ctypedef long long int64

    ctypedef struct utp_socket:
        pass
    ctypedef struct utp_context:
        pass

    int UTP_UDP_DONTFRAG

    enum:
        UTP_STATE_CONNECT
        UTP_STATE_WRITABLE
        UTP_STATE_EOF
        UTP_STATE_DESTROYING

    enum:
        UTP_ECONNREFUSED
        UTP_ECONNRESET
        UTP_ETIMEDOUT

    enum:
        UTP_ON_FIREWALL
        UTP_ON_ACCEPT
        UTP_ON_CONNECT
        UTP_ON_ERROR
        UTP_ON_READ
        UTP_ON_OVERHEAD_STATISTICS
        UTP_ON_STATE_CHANGE
        UTP_GET_READ_BUFFER_SIZE
        UTP_ON_DELAY_SAMPLE
        UTP_GET_UDP_MTU
        UTP_GET_UDP_OVERHEAD
        UTP_GET_MILLISECONDS
        UTP_GET_MICROSECONDS
        UTP_GET_RANDOM
        UTP_LOG
        UTP_SENDTO
        UTP_LOG_NORMAL
        UTP_LOG_MTU
        UTP_LOG_DEBUG
        UTP_SNDBUF
        UTP_RCVBUF
        UTP_TARGET_DELAY
        UTP_ARRAY_SIZE

    const char *utp_state_names[]
    const char *utp_error_code_names[]
    const char *utp_callback_names[]

    # The two anonymous unions of the C struct are flattened here: C code
    # reads args.address, args.state, ... directly, and so does Cython's.
    ctypedef struct utp_callback_arguments:
        utp_context *context
        utp_socket *socket
        size_t len
        uint32 flags
        int callback_type
        const byte *buf
        const sockaddr *address
        int send
        int sample_ms
        int error_code
        int state
        socklen_t address_len
        int type

    ctypedef uint64 utp_callback_t(utp_callback_arguments *) noexcept

    ctypedef struct utp_context_stats:
        uint32 _nraw_recv[5]
        uint32 _nraw_send[5]

    ctypedef struct utp_socket_stats:
        uint64 nbytes_recv
        uint64 nbytes_xmit
        uint32 rexmit
        uint32 fastrexmit
        uint32 nxmit
        uint32 nrecv
        uint32 nduprecv
        uint32 mtu_guess

    int UTP_IOV_MAX

    struct utp_iovec:
        void *iov_base
        size_t iov_len

    utp_context *utp_init(int version)
    void utp_destroy(utp_context *ctx)
    void utp_set_callback(utp_context *ctx, int callback_name, utp_callback_t *proc)
    void *utp_context_set_userdata(utp_context *ctx, void *userdata)
    void *utp_context_get_userdata(utp_context *ctx)
    int utp_context_set_option(utp_context *ctx, int opt, int val)
    int utp_context_get_option(utp_context *ctx, int opt)
    int utp_process_udp(utp_context *ctx, const byte *buf, size_t len,
                        const sockaddr *to, socklen_t tolen)
    int utp_process_icmp_error(utp_context *ctx, const byte *buffer, size_t len,
                               const sockaddr *to, socklen_t tolen)
    int utp_process_icmp_fragmentation(utp_context *ctx, const byte *buffer, size_t len,
                                       const sockaddr *to, socklen_t tolen,
                                       uint16 next_hop_mtu)
    void utp_check_timeouts(utp_context *ctx)
    void utp_issue_deferred_acks(utp_context *ctx)
    utp_context_stats *utp_get_context_stats(utp_context *ctx)
    utp_socket *utp_create_socket(utp_context *ctx)
    void *utp_set_userdata(utp_socket *s, void *userdata)
    void *utp_get_userdata(utp_socket *s)
    int utp_setsockopt(utp_socket *s, int opt, int val)
    int utp_getsockopt(utp_socket *s, int opt)
    int utp_connect(utp_socket *s, const sockaddr *to, socklen_t tolen)
    ssize_t utp_write(utp_socket *s, void *buf, size_t count)
    ssize_t utp_writev(utp_socket *s, utp_iovec *iovec, size_t num_iovecs)
    int utp_getpeername(utp_socket *s, sockaddr *addr, socklen_t *addrlen)
    void utp_read_drained(utp_socket *s)
    int utp_get_delays(utp_socket *s, uint32 *ours, uint32 *theirs, uint32 *age)
    utp_socket_stats *utp_get_stats(utp_socket *s)
    utp_context *utp_get_context(utp_socket *s)
    void utp_shutdown(utp_socket *s, int how)
    void utp_close(utp_socket *s)

    # utpkit extensions
    enum:
        UTPKIT_MIN_RTO
        UTPKIT_MAX_RTO
        UTPKIT_MAX_SOCKETS
        UTPKIT_SYN_TIMEOUT
        UTPKIT_SYN_RETRIES
        UTPKIT_ACK_DELAY
        UTPKIT_KEEPALIVE
        UTPKIT_DEAD_RETRIES
        UTPKIT_RESET_RATE
        UTPKIT_MTU_PROBING
        UTPKIT_HALF_OPEN_MAX
        UTPKIT_HALF_OPEN_PER_ADDR
        UTPKIT_SYNACK_RATE
        UTPKIT_OPTION_END

    enum:
        UTPKIT_FIREWALL_SYN
        UTPKIT_FIREWALL_COOKIE_SYN
        UTPKIT_FIREWALL_COOKIE_RETURN

    enum:
        UTPKIT_SOCK_IDLE
        UTPKIT_SOCK_SYN_SENT
        UTPKIT_SOCK_CONNECTED
        UTPKIT_SOCK_ERROR
        UTPKIT_SOCK_CLOSING
        UTPKIT_SOCK_DESTROYED

    ctypedef struct utpkit_counters:
        uint64 packets_in
        uint64 packets_out
        uint64 bytes_in
        uint64 bytes_out
        uint64 not_utp
        uint64 drop_malformed
        uint64 drop_unknown
        uint64 drop_invalid
        uint64 resets_sent
        uint64 resets_limited
        uint64 syn_refused
        uint64 syn_duplicate
        uint64 icmp_handled
        uint64 sockets_created
        uint64 sockets_freed
        uint32 sockets_live
        uint32 sockets_peak
        uint64 syn_invalid
        uint64 syn_cookies
        uint64 cookie_accepted
        uint64 unauth_limited
        uint64 unauth_bytes_in
        uint64 unauth_bytes_out
        uint32 half_open
        uint32 half_open_peak
        uint64 syn_abandoned

    ctypedef struct utpkit_socket_info:
        int state
        uint32 srtt_us
        uint32 rttvar_us
        uint32 rto_ms
        uint32 cwnd
        uint32 ssthresh
        uint32 in_flight
        uint32 peer_wnd
        uint32 send_queue
        uint32 reorder_bytes
        uint32 packet_size
        uint32 our_delay_us
        uint32 base_delay_us
        uint32 timeouts
        uint32 loss_events
        int slow_start
        uint16 seq_nr
        uint16 ack_nr
        int peer_confirmed

    int64 utpkit_next_timeout(utp_context *ctx)
    int64 utpkit_timewait_linger(utp_context *ctx)
    const utpkit_counters *utpkit_get_counters(utp_context *ctx)
    int utpkit_get_socket_info(utp_socket *s, utpkit_socket_info *info)
    void utpkit_abort(utp_socket *s)
    int utpkit_probe(utp_socket *s)

    enum:
        UTPKIT_CLASS_OTHER
        UTPKIT_CLASS_UTP
        UTPKIT_CLASS_DHT
        UTPKIT_CLASS_TRACKER

    int utpkit_classify(const byte *buf, size_t len)


# The real-socket hot path (utp/_udpio.h).  Cython emits #include "_udpio.c":
# the helper is compiled into the binding's own translation unit, so
# setup.py's source list does not change.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "_udpio.c" nogil:
    ctypedef struct udpio_dgram:
        size_t offset
        size_t length
        uint32_t flags
        socklen_t addrlen
        sockaddr_storage addr

    ctypedef struct udpio_queue:
        udpio_dgram *dg
        size_t n
        size_t cap
        unsigned char *data
        size_t len
        size_t data_cap

    int udpio_queue_push(udpio_queue *q, const void *buf, size_t len, const sockaddr *addr,
                         socklen_t addrlen, uint32_t flags)
    void udpio_queue_clear(udpio_queue *q)
    void udpio_queue_free(udpio_queue *q)
    socklen_t udpio_addr_convert(int family, const sockaddr *inp, socklen_t inlen,
                                 sockaddr_storage *out)

    ctypedef struct udpio_stats:
        uint64_t recv_calls
        uint64_t recv_datagrams
        uint64_t recv_bytes
        uint64_t recv_utp
        uint64_t recv_dht
        uint64_t recv_tracker
        uint64_t recv_other
        uint64_t recv_gro_batches
        uint64_t truncated
        uint64_t other_dropped
        uint64_t kernel_drops
        uint64_t errqueue_calls
        uint64_t errqueue_msgs
        uint64_t icmp_unreach
        uint64_t icmp_frag
        uint64_t icmp_other
        uint64_t local_errors
        uint64_t icmp_to_engine
        uint64_t icmp_matched
        uint64_t icmp_dropped
        uint64_t send_calls
        uint64_t sent_datagrams
        uint64_t sent_bytes
        uint64_t send_eagain
        uint64_t send_enobufs
        uint64_t send_retries
        uint64_t send_dropped
        uint64_t gso_batches
        uint64_t gso_datagrams
        uint64_t gso_failed
        uint64_t dontfrag_sent
        uint64_t emsgsize

    ctypedef struct udpio_setup_info:
        int family
        int rcvbuf
        int sndbuf
        int rmem_max
        int wmem_max
        int gso_supported
        int gso
        int gro
        int recverr

    ctypedef struct udpio:
        pass

    enum:
        UDPIO_NERRS
        UDPIO_RECV
        UDPIO_SEND

    udpio *udpio_new()
    void udpio_free(udpio *io)
    const udpio_stats *udpio_get_stats(const udpio *io)
    uint64_t udpio_get_err(const udpio *io, int dir, int err)
    udpio_queue *udpio_other(udpio *io)
    int udpio_setup(udpio *io, int fd, int rcvbuf, int sndbuf, int force, int gso, int gro,
                    udpio_setup_info *info)
    int udpio_recv(udpio *io, utp_context *ctx, int fd, int budget)
    int udpio_send(udpio *io, udpio_queue *q, int fd)
    int udpio_feedback(udpio *io, utp_context *ctx)
    int udpio_take_unreachable(udpio *io, sockaddr_storage *out, socklen_t *lens, int max)
    long udpio_blast_send(int fd, const sockaddr *to, socklen_t tolen, int size, long count)
    long udpio_blast_recv(int fd, long count, int idle_ms, long long *nbytes, double *seconds)
