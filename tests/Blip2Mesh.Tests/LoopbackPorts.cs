using System.Net;
using System.Net.Sockets;

namespace Blip2Mesh.Tests;

/// <summary>Free loopback ports for the services a test starts in its own process (a process it starts is given port 0 and says which it got).</summary>
public static class LoopbackPorts
{
    private const int First = 20000;
    private const int Count = 12000;
    private static int _next = Random.Shared.Next(Count);

    /// <summary>
    /// A port that is free now, chosen below Linux's ephemeral range (32768 and up): a port the kernel hands out for
    /// port 0 may be taken by an outgoing connection's local end before the service binds it; these are not.
    /// </summary>
    public static int Free()
    {
        for (var attempt = 0; attempt < Count; attempt++)
        {
            var port = First + (int)((uint)Interlocked.Increment(ref _next) % Count);
            try
            {
                using var listener = new TcpListener(IPAddress.Loopback, port);
                listener.Start();
                return port;
            }
            catch (SocketException)
            {
                // in use: try the next
            }
        }
        throw new InvalidOperationException($"no free loopback port in {First}-{First + Count - 1}");
    }
}
